"""Time to first token on CPU: Hugging Face eager vs an lmforge engine, for prompts of 32 and 512 tokens.

What it measures: the SmolLM-135M-shaped Llama of `decode_cpu.py` (or `--model llama-1b`), random weights, seed 0.
For each prompt length P and each row (float32, bfloat16, bfloat16 with int4 weights), the seconds from a random
batch-1 prompt of P tokens to its first generated token: `model.generate(ids, max_new_tokens=1)` for
transformers (eager, dynamic cache) and `engine.generate(ids, max_new_tokens=1)` for lmforge (prefill with the
last position's logits only, then one greedy pick). Each is warmed up once and timed as the best of `--repeats`
runs, lmforge's runs alternating with HF's in the same dtype so that both see the same machine conditions.

    prefill tok/s = P / seconds

Run (from the repository root):

    python bench/prefill_cpu.py [--model smollm-135m|llama-1b] [--prompt-lens 32,512] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import lmforge

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import DTYPES, SHAPES, best_of_interleaved, build_model, cpu_model  # noqa: E402

ROWS = (("float32", None), ("bfloat16", None), ("bfloat16", "int4"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="smollm-135m")
    p.add_argument("--prompt-lens", default="32,512", help="comma-separated prompt lengths (default 32,512)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; best counts (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    lens = [int(v) for v in args.prompt_lens.split(",") if v.strip()]
    if not lens or min(lens) < 1 or args.repeats < 1:
        p.error("--prompt-lens must be positive integers and --repeats >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    vocab = SHAPES[args.model]["vocab_size"]
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {args.model}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  {cpu_model()}  {torch.get_num_threads()} threads  "
          f"(best of {args.repeats})")
    head = ("prompt", "dtype", "engine", "TTFT ms", "prefill tok/s", "lmforge/HF")
    lines = [head]
    with tempfile.TemporaryDirectory(prefix="lmforge-prefill-bench-") as work:
        for dtype, quant in ROWS:
            hf = copy.deepcopy(model).to(DTYPES[dtype])
            out = Path(work) / f"{dtype}-{quant}"
            lmforge.optimize(model, output_dir=out, dtype=dtype, max_seq_len=-(-(max(lens) + 1) // 64) * 64,
                             quant=quant)
            eng = lmforge.load(out)
            for n in lens:
                ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
                (hf_s, _), (lm_s, _) = best_of_interleaved([
                    lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False),
                    lambda: eng.generate(ids, max_new_tokens=1),
                ], args.repeats)
                if quant is None:
                    lines.append((str(n), dtype, "HF eager", f"{1e3 * hf_s:.1f}", f"{n / hf_s:.0f}", "-"))
                lines.append((str(n), dtype, "lmforge" + (f" {quant}" if quant else ""), f"{1e3 * lm_s:.1f}",
                              f"{n / lm_s:.0f}", f"{hf_s / lm_s:.2f}x"))
            del eng, hf
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
