"""lmforge beside llama.cpp on the CPU: the same random weights, runs interleaved, decode and prefill rates.

What it measures: the SmolLM-135M-shaped Llama of `decode_cpu.py` (random weights, seed 0), in lmforge (float32,
bfloat16, int4, int4 with the lm_head in int4 too) and in llama.cpp's `llama-bench` (the GGUF files you give it,
converted from the same weights), 2 threads each:

    tg64   64 decode tokens from an empty context, tokens/s (llama-bench's tg test; lmforge: generate 65 tokens
           after a 1-token prompt, less the time of generating 1)
    pp32   a 32-token prompt, tokens/s (llama-bench's pp test; lmforge: `generate(ids, max_new_tokens=1)`)

Each round runs every llama.cpp row (flash attention off and on, `-r 3`) and every lmforge row (best of 3); the
best over `--rounds` rounds counts. llama.cpp is not installed by lmforge: build it yourself, then

    python bench/peers_cpu.py --save-hf /tmp/smol-hf        # the weights (+ the demo tokenizer) as a HF folder
    python convert_hf_to_gguf.py /tmp/smol-hf --outtype f32 --outfile /tmp/smol-f32.gguf   # llama.cpp's converter
    ... --outtype bf16 ...;  llama-quantize /tmp/smol-f32.gguf /tmp/smol-q4_0.gguf Q4_0 (and Q8_0)
    python bench/peers_cpu.py --llama-bench /path/to/llama-bench \\
        --gguf f32=/tmp/smol-f32.gguf,bf16=/tmp/smol-bf16.gguf,q8_0=/tmp/smol-q8_0.gguf,q4_0=/tmp/smol-q4_0.gguf

(The demo tokenizer's pre-tokenizer is unknown to llama.cpp's converter, which refuses it; the token ids of these
runs do not matter, so name it "gpt-2" there. Decode speed does not depend on them with random weights.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmforge

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import SMOLLM_135M, build_model, cpu_model  # noqa: E402

# lmforge rows: (label, dtype, quant, skip), each beside the GGUF of the same precision
LMFORGE = {"f32": [("float32", "float32", None, None)], "bf16": [("bfloat16", "bfloat16", None, None)],
           "q4_0": [("int4", "bfloat16", "int4", None), ("int4 (+lm_head)", "bfloat16", "int4", [])], "q8_0": []}


def llama_bench(binary: str, gguf: str, flash: str, threads: int) -> tuple[float, float]:
    """(pp32, tg64) tokens/s from one llama-bench run of 3 repetitions."""
    out = subprocess.run([binary, "-m", gguf, "-p", "32", "-n", "64", "-t", str(threads), "-r", "3", "-fa", flash,
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return rates["pp"], rates["tg"]


def lmforge_rates(eng, ids: torch.Tensor) -> tuple[float, float]:
    """(pp32, tg64) tokens/s, each the best of 3."""
    pp = t1 = t65 = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        eng.generate(ids, max_new_tokens=1)
        pp = min(pp, time.perf_counter() - start)
        start = time.perf_counter()
        eng.generate(ids[:, :1], max_new_tokens=1)
        t1 = min(t1, time.perf_counter() - start)
        start = time.perf_counter()
        eng.generate(ids[:, :1], max_new_tokens=65)
        t65 = min(t65, time.perf_counter() - start)
    return ids.shape[1] / pp, 64 / (t65 - t1)


def save_hf(out: Path) -> None:
    """The benchmark's weights as a Hugging Face folder, with the demo model's tokenizer files."""
    from lmforge import demo

    build_model().save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo.model_dir() / name).is_file():
            shutil.copy(demo.model_dir() / name, out / name)
    print(f"wrote {out}: convert it with llama.cpp's convert_hf_to_gguf.py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save-hf", type=Path, help="write the weights as a HF folder and stop")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    p.add_argument("--gguf", default="", help="precision=path pairs, comma-separated: f32, bf16, q8_0, q4_0")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    args = p.parse_args()
    if args.save_hf:
        save_hf(args.save_hf)
        return
    ggufs = dict(item.split("=", 1) for item in args.gguf.split(",") if item.strip())
    if not args.llama_bench or not ggufs or any(k not in LMFORGE for k in ggufs) or args.rounds < 1:
        p.error(f"give --llama-bench and --gguf with precisions among {', '.join(LMFORGE)} (or --save-hf)")
    torch.set_num_threads(args.threads)
    model = build_model()
    ids = torch.randint(0, SMOLLM_135M["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    best: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-peers-") as work:
        engines = {}
        for precision in ggufs:
            for label, dtype, quant, skip in LMFORGE[precision]:
                out = Path(work) / label.replace(" ", "_")
                lmforge.optimize(model, output_dir=out, dtype=dtype, quant=quant, skip=skip, max_seq_len=128)
                engines[precision, label] = lmforge.load(out)
                engines[precision, label].generate(ids, max_new_tokens=4)  # warm-up, kernels built
        for _ in range(args.rounds):
            for precision, path in ggufs.items():
                for flash in ("0", "1"):
                    pp, tg = llama_bench(args.llama_bench, path, flash, args.threads)
                    b = best.setdefault((precision, f"llama.cpp {precision.upper()} fa={flash}"), [0.0, 0.0])
                    b[0], b[1] = max(b[0], pp), max(b[1], tg)
                for (prec, label), eng in engines.items():
                    if prec == precision:
                        pp, tg = lmforge_rates(eng, ids)
                        b = best.setdefault((precision, f"lmforge {label}"), [0.0, 0.0])
                        b[0], b[1] = max(b[0], pp), max(b[1], tg)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {cpu_model()}  {args.threads} threads  torch {torch.__version__}  "
          f"(best of {args.rounds} interleaved rounds)")
    head = ("precision", "engine", "tg64 tok/s", "pp32 tok/s", "tg vs best llama.cpp")
    lines = [head]
    for (precision, engine), (pp, tg) in best.items():
        peer = max((v[1] for (pr, e), v in best.items() if pr == precision and e.startswith("llama.cpp")), default=0)
        lines.append((precision, engine, f"{tg:.1f}", f"{pp:.0f}", f"{tg / peer:.2f}x" if peer else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
