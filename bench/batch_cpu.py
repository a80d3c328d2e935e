"""Batched greedy decode on the CPU: lmforge bfloat16 beside lmforge int4 and int8 at batch 1-16, runs interleaved.

What it measures: the SmolLM-135M-shaped Llama of `decode_cpu.py` (or `--model llama-1b`; random weights, seed 0),
optimized to bfloat16, to int4 (lmforge's default groups), to int8 (per channel), and to each of those two with the
lm_head quantized too (`--engines` picks among them). For each batch size B, `generate` on B random prompts of P
tokens makes N new tokens; one decode step is

    step ms   = the median time between two of the N tokens `iter_tokens` yields (a decode step and its greedy pick)
    tokens/s  = B / step seconds (decode only, prefill excluded)
    int4/bf16 = bf16 step time / int4 step time (issue 13's goal: never below 1.00x at batch 4 and 16)

Each round times every engine at every batch size once (best of 2 runs each); the best over `--rounds` counts.

Run (from the repository root):

    python bench/batch_cpu.py [--model smollm-135m|llama-1b] [--batches 1,4,8,16] [--new-tokens 16]
                              [--prompt-len 32] [--rounds 3] [--threads N]
                              [--engines bf16,int4,int4-head,int8,int8-head]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmforge

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import SHAPES, build_model, cpu_model  # noqa: E402

# name: (label, quant, skip)
ENGINES = {"bf16": ("bf16", None, None), "int4": ("int4", "int4", None), "int4-head": ("int4 (+lm_head)", "int4", []),
           "int8": ("int8", "int8", None), "int8-head": ("int8 (+lm_head)", "int8", [])}


def step_seconds(eng, ids: torch.Tensor, new_tokens: int) -> float:
    """One decode step of a batch: the median time between the tokens `iter_tokens` yields after the first (no
    eos, so every run makes all `new_tokens`), best of 2 runs."""
    best = float("inf")
    for _ in range(2):
        stamps = [time.perf_counter() for _ in eng.iter_tokens(ids, new_tokens, eos_token_id=-1)]
        best = min(best, statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="smollm-135m", help="the model's shape (default smollm-135m)")
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes, comma-separated (default 1,4,8,16)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default 16)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, bf16 first (default {','.join(ENGINES)})")
    args = p.parse_args()
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not names or names[0] != "bf16" or any(e not in ENGINES for e in names):
        p.error(f"--engines takes bf16 first, then any of {', '.join(list(ENGINES)[1:])}")
    labels = {ENGINES[e][0]: ENGINES[e][1:] for e in names}
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.new_tokens < 2 or args.prompt_len < 1 or args.rounds < 1:
        p.error("--batches takes positive integers; --new-tokens >= 2; --prompt-len and --rounds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen) for b in batches}
    best: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-batch-") as work:
        engines = {}
        for label, (quant, skip) in labels.items():
            out = Path(work) / label.replace(" ", "_").replace("(", "").replace(")", "")
            lmforge.optimize(model, output_dir=out, dtype="bfloat16", quant=quant, skip=skip,
                             max_seq_len=args.prompt_len + args.new_tokens)
            engines[label] = lmforge.load(out)
            engines[label].generate(prompts[batches[0]], max_new_tokens=2)  # warm-up, kernels built
        for _ in range(args.rounds):
            for b in batches:
                for label, eng in engines.items():
                    seconds = step_seconds(eng, prompts[b], args.new_tokens)
                    best[label, b] = min(best.get((label, b), float("inf")), seconds)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {args.model}  {cpu_model()}  {torch.get_num_threads()} threads  "
          f"torch {torch.__version__}  (prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.rounds} "
          "interleaved rounds)")
    head = ("batch", *(f"{label} step ms" for label in labels), *(f"{label} tok/s" for label in labels),
            *(f"{label}/bf16" for label in list(labels)[1:]))
    lines = [head]
    for b in batches:
        steps = [best[label, b] for label in labels]
        lines.append((str(b), *(f"{s * 1e3:.2f}" for s in steps), *(f"{b / s:.0f}" for s in steps),
                      *(f"{steps[0] / s:.2f}x" for s in steps[1:])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
