"""lmforge beside llama.cpp and ONNX Runtime GenAI on the CPU: the same random weights, runs interleaved.

What it measures: the SmolLM-135M-shaped Llama of `decode_cpu.py` (or with `--model llama-1b` its Llama-3.2-1B-shaped
one; random weights, seed 0), in lmforge (float32,
bfloat16, int4 and int8, each also with the lm_head quantized), in llama.cpp's `llama-bench` (the GGUF files you give it,
converted from the same weights) and in onnxruntime-genai (models its own builder makes from the same weights,
`--ort-genai`), 2 threads each:

    tg64   64 decode tokens from an empty context, tokens/s (llama-bench's tg test; lmforge: generate 65 tokens
           after a 1-token prompt, less the time of generating 1)
    pp32   a 32-token prompt (`--prompt N`: N tokens), tokens/s (llama-bench's pp test; lmforge:
           `generate(ids, max_new_tokens=1)`)

Each round runs every llama.cpp row (flash attention off and on, `-r 3`) and every lmforge row (best of 3); the
best over `--rounds` rounds counts. llama.cpp is not installed by lmforge: build it yourself, then

    python bench/peers_cpu.py --save-hf /tmp/smol-hf        # the weights (+ the demo tokenizer) as a HF folder
    python convert_hf_to_gguf.py /tmp/smol-hf --outtype f32 --outfile /tmp/smol-f32.gguf   # llama.cpp's converter
    ... --outtype bf16 ...;  llama-quantize /tmp/smol-f32.gguf /tmp/smol-q4_0.gguf Q4_0 (and Q8_0)
    python bench/peers_cpu.py --llama-bench /path/to/llama-bench \\
        --gguf f32=/tmp/smol-f32.gguf,bf16=/tmp/smol-bf16.gguf,q8_0=/tmp/smol-q8_0.gguf,q4_0=/tmp/smol-q4_0.gguf \\
        --ort-genai fp32,int4-b32,int4-b64,int8

ONNX Runtime GenAI (`pip install -e ".[peers]"`: onnxruntime-genai, onnxruntime, onnx_ir) builds its models here,
with `python -m onnxruntime_genai.models.builder -p fp32|int4|int8 -e cpu` (int4: its default accuracy level, which
multiplies in int8, block 32 or 64, the lm_head in int4 too), and runs them with `intra_op_num_threads` set to
--threads; its rates are timed the same way as lmforge's (tg64: 65 tokens after a 1-token prompt less 1).

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
from decode_cpu import SHAPES, build_model, cpu_model  # noqa: E402

# lmforge rows: (label, dtype, quant, skip), each beside the GGUF of the same precision
LMFORGE = {"f32": [("float32", "float32", None, None)], "bf16": [("bfloat16", "bfloat16", None, None)],
           "q4_0": [("int4", "bfloat16", "int4", None), ("int4 (+lm_head)", "bfloat16", "int4", [])],
           "q8_0": [("int8", "bfloat16", "int8", None), ("int8 (+lm_head)", "bfloat16", "int8", [])]}


# ONNX Runtime GenAI rows: name -> (group of rows it stands beside, builder arguments)
ORT_GENAI = {"fp32": ("f32", ["-p", "fp32"]), "int4-b32": ("q4_0", ["-p", "int4", "--extra_options", "int4_block_size=32"]),
             "int4-b64": ("q4_0", ["-p", "int4", "--extra_options", "int4_block_size=64"]),
             "int8": ("q8_0", ["-p", "int8"])}


def ort_genai_model(hf_dir: Path, name: str, out: Path, threads: int):
    """onnxruntime-genai's model of `hf_dir`, built by its own builder with ORT_GENAI[name]'s arguments."""
    import onnxruntime_genai as og

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-e", "cpu",
           "-c", str(out / "cache"), *ORT_GENAI[name][1]]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"peers_cpu: onnxruntime-genai's builder failed on {name}: {built.stderr.strip().splitlines()[-1:]}")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    return og.Model(str(out))


def best_rates(run, prompt, first) -> tuple[float, float]:
    """(pp, tg64) tokens/s, each the best of 3, from `run(prompt, new)`, the seconds an engine takes to make `new`
    tokens after `prompt`: pp = len(prompt) tokens / making 1 after it; tg64 = 64 tokens / (making 65 after the
    1-token prompt `first`, less making 1 after it)."""
    pp = t1 = t65 = float("inf")
    for _ in range(3):
        pp, t1, t65 = min(pp, run(prompt, 1)), min(t1, run(first, 1)), min(t65, run(first, 65))
    return len(prompt) / pp, 64 / (t65 - t1)


def ort_genai_rates(model, ids: torch.Tensor) -> tuple[float, float]:
    """(pp, tg64) tokens/s (best_rates) of an onnxruntime-genai model."""
    import onnxruntime_genai as og

    def run(prompt, new: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)  # the prompt's logits: the first new token
        for _ in range(new - 1):
            gen.generate_next_token()
        return time.perf_counter() - start

    prompt = ids[0].to(torch.int32).numpy()
    return best_rates(run, prompt, prompt[:1])


def llama_bench(binary: str, gguf: str, flash: str, threads: int, prompt: int = 32) -> tuple[float, float]:
    """(pp, tg64) tokens/s from one llama-bench run of 3 repetitions, pp over `prompt` tokens."""
    out = subprocess.run([binary, "-m", gguf, "-p", str(prompt), "-n", "64", "-t", str(threads), "-r", "3", "-fa", flash,
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return rates["pp"], rates["tg"]


def lmforge_rates(eng, ids: torch.Tensor) -> tuple[float, float]:
    """(pp, tg64) tokens/s (best_rates) of an lmforge engine."""

    def run(prompt: torch.Tensor, new: int) -> float:
        start = time.perf_counter()
        eng.generate(prompt[None], max_new_tokens=new)
        return time.perf_counter() - start

    return best_rates(run, ids[0], ids[0, :1])


def print_table(lines: list[tuple[str, ...]]) -> None:
    """Rows of cells as aligned columns (the first two left-aligned, numbers right), a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for k, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def save_hf(out: Path, shape: str) -> None:
    """The benchmark's weights (`shape`, a decode_cpu.SHAPES name) as a Hugging Face folder, with the demo model's
    tokenizer files."""
    from lmforge import demo

    build_model(shape).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo.model_dir() / name).is_file():
            shutil.copy(demo.model_dir() / name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="smollm-135m",
                   help="the model's shape (default smollm-135m; the GGUF files must be of the same one)")
    p.add_argument("--save-hf", type=Path, help="write the weights as a HF folder and stop")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    p.add_argument("--gguf", default="", help="precision=path pairs, comma-separated: f32, bf16, q8_0, q4_0")
    p.add_argument("--ort-genai", default="", help=f"onnxruntime-genai rows, comma-separated: {', '.join(ORT_GENAI)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens of the pp test (default 32)")
    args = p.parse_args()
    if args.save_hf:
        save_hf(args.save_hf, args.model)
        print(f"wrote {args.save_hf}: convert it with llama.cpp's convert_hf_to_gguf.py")
        return
    ggufs = dict(item.split("=", 1) for item in args.gguf.split(",") if item.strip())
    orts = [name.strip() for name in args.ort_genai.split(",") if name.strip()]
    if args.prompt < 1:
        p.error("--prompt must be at least 1")
    if bool(args.llama_bench) != bool(ggufs) or any(k not in LMFORGE for k in ggufs) or args.rounds < 1:
        p.error(f"give --llama-bench and --gguf with precisions among {', '.join(LMFORGE)} together (or --save-hf)")
    if any(name not in ORT_GENAI for name in orts) or not (ggufs or orts):
        p.error(f"give --gguf, --ort-genai (among {', '.join(ORT_GENAI)}) or both")
    groups = list(dict.fromkeys([*ggufs, *(ORT_GENAI[name][0] for name in orts)]))
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    ids = torch.randint(0, SHAPES[args.model]["vocab_size"], (1, args.prompt),
                        generator=torch.Generator().manual_seed(0))
    best: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-peers-") as work:
        ort_models = {}
        if orts:
            hf_dir = Path(work) / "hf"
            save_hf(hf_dir, args.model)
            for name in orts:
                ort_models[ORT_GENAI[name][0], name] = ort_genai_model(hf_dir, name, Path(work) / f"ort-{name}",
                                                                      args.threads)
        engines = {}
        for precision in groups:
            for label, dtype, quant, skip in LMFORGE[precision]:
                out = Path(work) / label.replace(" ", "_")
                lmforge.optimize(model, output_dir=out, dtype=dtype, quant=quant, skip=skip, max_seq_len=max(128, -(-(args.prompt + 1) // 64) * 64))
                engines[precision, label] = lmforge.load(out)
                engines[precision, label].generate(ids, max_new_tokens=4)  # warm-up, kernels built
        for _ in range(args.rounds):
            for precision in groups:
                for flash in ("0", "1") if precision in ggufs else ():
                    pp, tg = llama_bench(args.llama_bench, ggufs[precision], flash, args.threads, args.prompt)
                    b = best.setdefault((precision, f"llama.cpp {precision.upper()} fa={flash}"), [0.0, 0.0])
                    b[0], b[1] = max(b[0], pp), max(b[1], tg)
                for (prec, name), model in ort_models.items():
                    if prec == precision:
                        pp, tg = ort_genai_rates(model, ids)
                        b = best.setdefault((precision, f"onnxruntime-genai {name}"), [0.0, 0.0])
                        b[0], b[1] = max(b[0], pp), max(b[1], tg)
                for (prec, label), eng in engines.items():
                    if prec == precision:
                        pp, tg = lmforge_rates(eng, ids)
                        b = best.setdefault((precision, f"lmforge {label}"), [0.0, 0.0])
                        b[0], b[1] = max(b[0], pp), max(b[1], tg)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {args.model}  {cpu_model()}  {args.threads} threads  "
          f"torch {torch.__version__}  "
          f"(best of {args.rounds} interleaved rounds)")
    head = ("precision", "engine", "tg64 tok/s", f"pp{args.prompt} tok/s", "tg vs best peer", "pp vs best peer")
    lines = [head]
    for (precision, engine), (pp, tg) in best.items():
        peers = [v for (pr, e), v in best.items() if pr == precision and not e.startswith("lmforge")]
        peer_pp, peer_tg = max((v[0] for v in peers), default=0), max((v[1] for v in peers), default=0)
        lines.append((precision, engine, f"{tg:.1f}", f"{pp:.0f}", f"{tg / peer_tg:.2f}x" if peer_tg else "-",
                      f"{pp / peer_pp:.2f}x" if peer_pp else "-"))
    print_table(lines)


if __name__ == "__main__":
    main()
