"""Quality beside the peers: perplexity of the demo model in lmforge, llama.cpp and ONNX Runtime GenAI, per precision.

What it measures: the embedded demo model (`lmforge/demo/model`, trained, bfloat16) scored on its held-out text
(`heldout.txt`, 9644 tokens with its tokenizer), in

    lmforge             `lmforge.optimize` at float32, bfloat16, int8 and int4 (each quantized one also with the
                        lm_head quantized), fp8; `lmforge.runtime.evaluate.perplexity`: non-overlapping windows of
                        `--window` tokens, every token after each window's first scored (what `lmforge eval` does)
    ONNX Runtime GenAI  models its own builder makes from the demo folder (`--ort-genai fp32,int4-b32,int8`),
                        run through onnxruntime on the same token ids and the same windows: the same protocol,
                        so its numbers compare with lmforge's directly
    llama.cpp           the GGUF files you give (`--gguf f32=...,q8_0=...,q4_0=...`, converted from the demo folder
                        with llama.cpp's converter), scored by its `llama-perplexity -c WINDOW` on the same text: its
                        own tokenization of the text and its own protocol (the second half of each window scored),
                        so only its rows' ratio to its own f32 row compares with the others'

and prints one table: engine, precision, perplexity, and the ratio to the same engine's unquantized row (float32 for
llama.cpp and ONNX Runtime GenAI, bfloat16 for lmforge, the dtype its quantized rows compute in).

Run (from the repository root):

    python bench/peers_quality.py                                      # lmforge rows only
    python bench/peers_quality.py --ort-genai fp32,int4-b32,int8       # pip install -e ".[peers]"
    python convert_hf_to_gguf.py lmforge/demo/model --outtype f32 --outfile /tmp/demo-f32.gguf   # llama.cpp's
    llama-quantize /tmp/demo-f32.gguf /tmp/demo-q4_0.gguf Q4_0                                    # (and Q8_0)
    python bench/peers_quality.py --llama-perplexity /path/to/llama-perplexity \\
        --gguf f32=/tmp/demo-f32.gguf,q8_0=/tmp/demo-q8_0.gguf,q4_0=/tmp/demo-q4_0.gguf

(llama.cpp's converter does not know the demo tokenizer's pre-tokenizer; `peers_cpu.py`'s note applies.)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import lmforge
from lmforge import demo
from lmforge.runtime.evaluate import perplexity

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import cpu_model  # noqa: E402
from peers_cpu import ORT_GENAI, ort_genai_model, print_table  # noqa: E402

# lmforge rows: name -> (label, optimize arguments)
LMFORGE = {"float32": ("float32", dict(dtype="float32")), "bfloat16": ("bfloat16", dict(dtype="bfloat16")),
           "int8": ("int8", dict(quant="int8")), "int8-head": ("int8 (+lm_head)", dict(quant="int8", skip=[])),
           "int4": ("int4 g128", dict(quant="int4")),
           "int4-head": ("int4 g128 (+lm_head)", dict(quant="int4", skip=[])),
           "int4-g32-sym": ("int4 g32 sym", dict(quant="int4", group_size=32, symmetric=True)),
           "fp8": ("fp8", dict(quant="fp8"))}
BASELINE = {"lmforge": "bfloat16", "onnxruntime-genai": "fp32", "llama.cpp": "F32"}


def lmforge_rows(names: list[str], ids: list[int], window: int, work: Path) -> dict[str, float]:
    rows = {}
    for name in names:
        label, kwargs = LMFORGE[name]
        out = work / f"lmforge-{name}"
        lmforge.optimize(None, output_dir=out, max_seq_len=window, **kwargs)
        rows[label] = perplexity(lmforge.load(out), ids=ids, window=window).perplexity
    return rows


def ort_perplexity(model_dir: Path, ids: list[int], window: int, threads: int) -> float:
    """Perplexity of onnxruntime-genai's `model_dir/model.onnx` on `ids`, windows as `lmforge eval` takes them:
    each window run from an empty cache, every token after its first scored."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = np.array(ids[start:start + window], dtype=np.int64)[None]
        if chunk.shape[1] < 2:
            continue
        n = chunk.shape[1]
        feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, spec in inputs.items():  # the past: (batch, kv heads, 0, head dim) in the model's io dtype
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in spec.type else np.float32
                feed[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
        logits = torch.from_numpy(np.asarray(session.run(["logits"], feed)[0], dtype=np.float32))
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        total -= float(logp.gather(-1, torch.from_numpy(chunk[0, 1:])[:, None]).sum())
        count += n - 1
    return math.exp(total / count)


def ort_rows(names: list[str], ids: list[int], window: int, threads: int, work: Path) -> dict[str, float]:
    rows = {}
    for name in names:
        out = work / f"ort-{name}"
        ort_genai_model(demo.model_dir(), name, out, threads)
        rows[name] = ort_perplexity(out, ids, window, threads)
    return rows


def llama_cpp_rows(binary: str, ggufs: dict[str, str], text: Path, window: int, threads: int) -> dict[str, float]:
    rows = {}
    for precision, path in ggufs.items():
        out = subprocess.run([binary, "-m", path, "-f", str(text), "-c", str(window), "-t", str(threads)],
                             capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if out.returncode != 0 or not found:
            raise SystemExit(f"peers_quality: llama-perplexity failed on {path}: {(out.stderr or out.stdout)[-300:]}")
        rows[precision.upper()] = float(found.group(1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-perplexity", help="path of llama.cpp's llama-perplexity")
    p.add_argument("--gguf", default="", help="precision=path pairs of the demo model, comma-separated: f32 first")
    p.add_argument("--ort-genai", default="", help=f"onnxruntime-genai rows, comma-separated: {', '.join(ORT_GENAI)}")
    p.add_argument("--lmforge", default=",".join(LMFORGE), help=f"lmforge rows, comma-separated, bfloat16 first "
                                                                  f"(default {','.join(LMFORGE)})")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256, lmforge eval's)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    args = p.parse_args()
    ggufs = dict(item.split("=", 1) for item in args.gguf.split(",") if item.strip())
    orts = [name.strip() for name in args.ort_genai.split(",") if name.strip()]
    if bool(args.llama_perplexity) != bool(ggufs) or (ggufs and next(iter(ggufs)) != "f32"):
        p.error("give --llama-perplexity and --gguf (f32 first) together")
    if any(name not in ORT_GENAI for name in orts) or (orts and orts[0] != "fp32"):
        p.error(f"--ort-genai takes fp32 first, then any of {', '.join(list(ORT_GENAI)[1:])}")
    names = [name.strip() for name in args.lmforge.split(",") if name.strip()]
    if any(name not in LMFORGE for name in names):
        p.error(f"--lmforge takes any of {', '.join(LMFORGE)}")
    if args.window < 16 or args.window > 1024:
        p.error("--window must be between 16 and 1024 (the demo model's positions)")
    torch.set_num_threads(args.threads)
    text = demo.model_dir() / "heldout.txt"
    tokenizer = Tokenizer.from_file(str(demo.model_dir() / "tokenizer.json"))  # the one its artifacts carry
    ids = tokenizer.encode(text.read_text(), add_special_tokens=False).ids
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-quality-") as work:
        results["lmforge"] = lmforge_rows(names, ids, args.window, Path(work))
        if orts:
            results["onnxruntime-genai"] = ort_rows(orts, ids, args.window, args.threads, Path(work))
        if ggufs:
            results["llama.cpp"] = llama_cpp_rows(args.llama_perplexity, ggufs, text, args.window, args.threads)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  demo model, {len(ids)} held-out tokens, window {args.window}  "
          f"{cpu_model()}  torch {torch.__version__}")
    lines = [("engine", "precision", "perplexity", "vs its unquantized")]
    for engine, rows in results.items():
        base = rows.get(BASELINE[engine])
        for precision, ppl in rows.items():
            lines.append((engine, precision, f"{ppl:.4f}", f"{100 * (ppl / base - 1):+.2f} %" if base else "-"))
    print_table(lines)


if __name__ == "__main__":
    main()
