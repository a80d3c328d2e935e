"""lmforge's exports in their consumers beside lmforge itself: the same optimized model, runs interleaved.

For the SmolLM-135M-shaped Llama of `decode_cpu.py` (or `--model llama-1b`; random weights, seed 0), each row
optimizes it once (float32, bfloat16, int8, int4 symmetric in groups of 32), exports that artifact with
`lmforge export --format gguf` (the int8 layers requantized to Q8_0, the int4 ones exactly Q4_0), `--format onnx`
(float32 compute; int8/int4 layers as MatMulNBits, exactly) and `--format hf`, and then times, round by round,
lmforge's engine on the artifact, llama.cpp (llama-cpp-python) on the GGUF file and onnxruntime-genai on the
ONNX directory, with the same threads, on the same token ids:

    tg64   64 decode tokens from a 1-token prompt, tokens/s (65 tokens made, less the time of making 1)
    pp32   a 32-token prompt, tokens/s (the prompt's logits: making 1 token after it)

and prints one table: tokens/s of each, lmforge's ratio to each, the export wall times and the sizes of the
artifact, the hf directory, the GGUF file and the ONNX directory. The best of 3 per round and of `--rounds`
rounds counts.

    pip install -e ".[dev]"          # llama-cpp-python, gguf, onnx, onnxruntime-genai
    python bench/export_cpu.py [--model llama-1b] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmforge

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import SHAPES, build_model, cpu_model  # noqa: E402
from peers_cpu import best_rates, lmforge_rates, ort_genai_rates, print_table  # noqa: E402

# label -> (dtype, optimize's quantization options)
ROWS = {"f32": ("float32", {}), "bf16": ("bfloat16", {}), "int8 -> Q8_0": ("bfloat16", {"quant": "int8"}),
        "int4 g32 sym -> Q4_0": ("bfloat16", {"quant": "int4", "group_size": 32, "symmetric": True})}


def llama_cpp_rates(llm, ids: torch.Tensor) -> tuple[float, float]:
    """(pp, tg64) tokens/s (best_rates) of a llama_cpp.Llama, greedy from its own logits."""

    def run(prompt: list[int], new: int) -> float:
        start = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(new - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - start

    prompt = ids[0].tolist()
    return best_rates(run, prompt, prompt[:1])


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def genai_model(onnx_dir: Path, threads: int):
    import onnxruntime_genai as og

    path = onnx_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))
    return og.Model(str(onnx_dir))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="smollm-135m", help="model shape (default smollm-135m)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := [r for r in rows if r not in ROWS]:
        p.error(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be 1 or more")
    import llama_cpp

    torch.set_num_threads(args.threads)
    ids = torch.randint(1, SHAPES[args.model]["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        made = {}
        for row in rows:
            dtype, quant = ROWS[row]
            art = work / f"art{len(made)}"
            lmforge.optimize(build_model(args.model), art, dtype=dtype, max_seq_len=128, **quant)
            gguf, hf, onnx = work / f"{art.name}.gguf", work / f"{art.name}-hf", work / f"{art.name}-onnx"
            seconds = {fmt: timed(lambda: lmforge.export(art, format=fmt, output_dir=out))
                       for fmt, out in (("gguf", gguf), ("hf", hf), ("onnx", onnx))}
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_batch=128, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            made[row] = dict(eng=lmforge.load(art), llm=llm, og=genai_model(onnx, args.threads), seconds=seconds,
                             sizes=(size(art), size(hf), size(gguf), size(onnx)))
        engines = ("lmforge", "llama.cpp", "onnxruntime-genai")
        best = {row: {engine: (0.0, 0.0) for engine in engines} for row in rows}
        for _ in range(args.rounds):
            for row in rows:
                m = made[row]
                for engine, rates in (("lmforge", lmforge_rates(m["eng"], ids)),
                                      ("llama.cpp", llama_cpp_rates(m["llm"], ids)),
                                      ("onnxruntime-genai", ort_genai_rates(m["og"], ids))):
                    old = best[row][engine]
                    best[row][engine] = (max(old[0], rates[0]), max(old[1], rates[1]))
    import onnxruntime_genai as og

    print(f"# {args.model}, {cpu_model()}, {args.threads} threads, torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__}, onnxruntime-genai {og.__version__}, best of {args.rounds} rounds")
    lines = [("row", "engine", "tg64 tok/s", "pp32 tok/s", "tg lmforge/it", "pp lmforge/it", "export s", "MB")]
    for row in rows:
        m = made[row]
        ours = best[row]["lmforge"]
        lines.append((row, "lmforge (artifact)", f"{ours[1]:.1f}", f"{ours[0]:.0f}", "", "", "",
                      f"{m['sizes'][0] / 1e6:.1f}"))
        for engine, fmt, i in (("llama.cpp", "gguf", 2), ("onnxruntime-genai", "onnx", 3)):
            theirs = best[row][engine]
            lines.append((row, f"{engine} (our {fmt})", f"{theirs[1]:.1f}", f"{theirs[0]:.0f}",
                          f"{ours[1] / theirs[1]:.2f}x", f"{ours[0] / theirs[0]:.2f}x", f"{m['seconds'][fmt]:.2f}",
                          f"{m['sizes'][i] / 1e6:.1f}"))
        lines.append((row, "(hf export)", "", "", "", "", f"{m['seconds']['hf']:.2f}", f"{m['sizes'][1] / 1e6:.1f}"))
    print_table(lines)


if __name__ == "__main__":
    main()
