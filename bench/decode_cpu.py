"""Greedy-generation throughput on CPU: Hugging Face eager `generate` vs an lmforge engine.

What it measures: a SmolLM-135M-shaped Llama (or, with `--model llama-1b`, a Llama-3.2-1B-shaped one; random
weights, seed 0) generates exactly N new tokens
after a random batch-1 prompt of P tokens, in float32 and in bfloat16, once with transformers'
`model.generate` (eager, dynamic cache) and once with `lmforge.load(...).generate`; then lmforge again
with its weights quantized (`--quant`, default int4; `int4-head` quantizes the tied lm_head too, as ONNX Runtime
GenAI's int4 does; int8, int8-head and fp8 too if asked) at `--group-size` (default: lmforge's,
128 where it divides a layer's in_features, else the largest that does: SmolLM's 576 -> 64), computing in bfloat16. Each is warmed up once and timed as the best of `--repeats` runs of the whole call (prefill +
decode), each lmforge engine's runs alternating with HF's in the same dtype so that both see the same
machine conditions:

    tokens/s      = N / seconds
    bytes/step    = weight bytes (each parameter once, tied embeddings once; for lmforge, the weights as
                    the engine holds them: packed int4 plus its scales and zero points, bfloat16 in a bfloat16 engine)
                    + KV-cache bytes per token * (P + N / 2)          (the mean context of a decode step)
    GB/s          = bytes/step * tokens/s, the read rate the run achieved
    bandwidth %   = GB/s over the memory read bandwidth, the best of its measures at the start of the run and
                    right after the row's timed runs (this VM's bandwidth drifts by up to 1.5x within minutes)
    vs HF fp32    = tokens/s over HF eager's float32 tokens/s (issue 5's target: int4 at 3x or more)

The bandwidth share counts the prefill time as decode time, so it slightly understates the decode
loop's own share. For each lmforge engine, "step ms" is one decode step at the mean context, split into
matmuls, attention and everything else in the proportions a node-by-node timing gives
(`lmforge.runtime.measure.step_split`). The "match" column counts the positions among the N generated tokens where lmforge
picked the same token as transformers in the same dtype (float32 should match all N).

Run (from the repository root):

    python bench/decode_cpu.py [--model smollm-135m|llama-1b] [--dtypes float32,bfloat16] [--new-tokens 64]
                               [--prompt-len 32] [--repeats 5] [--threads N] [--quant int4,int4-head,int4-q8,fp8,int8]
                               [--group-size G] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import lmforge
from lmforge.codegen import cpu_gemv
from lmforge.runtime.measure import memory_bandwidth, step_split

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                   rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)  # Llama-3.2-1B's shape
# for the benchmark scripts' smoke tests: the same code paths in seconds, figures meaningless
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
            rms_norm_eps=1e-5)
SHAPES = {"smollm-135m": SMOLLM_135M, "llama-1b": LLAMA_1B, "tiny": TINY}
QUANTS = ("int4", "int4-head", "int4-q8", "fp8", "int8", "int8-head")
# torch.export's own run_decompositions (inside lmforge.optimize) trips this deprecation warning of torch's
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@dataclass
class Row:
    dtype: str
    engine: str
    tokens_per_s: float
    ratio_vs_hf: float | None  # lmforge tokens/s over HF tokens/s in the same dtype
    bandwidth_share: float  # achieved bytes/s over measured read bandwidth, 0..1
    matching_tokens: int | None  # of the N generated tokens, how many equal HF's
    achieved_gb_s: float = 0.0  # bytes/step * tokens/s
    ratio_vs_hf_fp32: float | None = None  # tokens/s over HF eager float32's
    split_ms: tuple[float, float, float, float] | None = None  # lmforge: one decode step, matmuls, attention, rest


def build_model(shape: str = "smollm-135m") -> LlamaForCausalLM:
    """The `shape`d Llama (SHAPES) in float32, random weights from seed 0, with no eos token."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], dtype="float32")).eval()
    model.generation_config.eos_token_id = None  # never stop early and never suppress a token
    model.generation_config.pad_token_id = 0
    return model


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo ("unknown" if absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters; `parameters()` yields a tied tensor only once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def best_of_interleaved(fns: list[Callable[[], torch.Tensor]], repeats: int) -> list[tuple[float, torch.Tensor]]:
    """Warm each of `fns` up once, then time them in turn, `repeats` rounds; each one's best seconds and last
    output. Alternating keeps both engines under the same machine conditions (this VM's speed drifts)."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def bench_dtype(model: LlamaForCausalLM, dtype: str, ids: torch.Tensor, new_tokens: int, repeats: int,
                workdir: Path, bandwidth: float, quant: str | None = None, group_size: int | None = None,
                skip: list[str] | None = None) -> list[Row]:
    """The HF-eager and lmforge rows for one dtype (and quantization scheme)."""
    prompt_len = ids.shape[1]
    hf = copy.deepcopy(model).to(DTYPES[dtype])
    mask = torch.ones_like(ids)
    max_seq_len = -(-(prompt_len + new_tokens) // 64) * 64
    out_dir = workdir / f"{dtype}-{quant}-{'head' if skip == [] else 'nohead'}"
    lmforge.optimize(model, output_dir=out_dir, dtype=dtype, max_seq_len=max_seq_len, quant=quant,
                     group_size=group_size, skip=skip)
    eng = lmforge.load(out_dir)
    hf_weights = weight_bytes(hf)
    step_weights = hf_weights if quant is None else engine_weight_bytes(eng)
    (hf_s, hf_out), (lm_s, lm_out) = best_of_interleaved([
        lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False),
        lambda: eng.generate(ids, max_new_tokens=new_tokens, do_sample=False),
    ], repeats)
    bandwidth = max(bandwidth, memory_bandwidth("cpu"))  # the machine as it is now, too
    kv_bytes = eng.ir.kv.bytes_per_token() * (prompt_len + new_tokens / 2)
    split = step_split(eng, prompt_len + new_tokens // 2)
    del eng, hf

    step_bytes = step_weights + kv_bytes
    hf_tps, lm_tps = new_tokens / hf_s, new_tokens / lm_s
    hf_new, lm_new = hf_out[0, prompt_len:], lm_out[0, prompt_len:]
    if hf_new.numel() != new_tokens or lm_new.numel() != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, got HF {hf_new.numel()}, lmforge {lm_new.numel()}")
    matching = int((hf_new == lm_new).sum())
    hf_step_bytes = hf_weights + kv_bytes
    return [
        Row(dtype, "HF eager", hf_tps, None, hf_step_bytes * hf_tps / bandwidth, None,
            achieved_gb_s=hf_step_bytes * hf_tps / 1e9),
        Row(dtype, "lmforge" + (f" {quant}" + (f" g{group_size}" if quant == "int4" and group_size else "") if quant else ""),
            lm_tps, lm_tps / hf_tps,
            step_bytes * lm_tps / bandwidth, matching, achieved_gb_s=step_bytes * lm_tps / 1e9,
            split_ms=tuple(1e3 * t for t in (split.step_s, split.matmul_s, split.attention_s, split.other_s))),
    ]


def engine_weight_bytes(eng) -> int:
    """Bytes of the weights a loaded engine reads per step, excluding position tables it only indexes."""
    return sum(t.numel() * t.element_size() for attr, t in eng.ir.weights().items()
               if eng.ir.weight_kind(attr) == "parameter")


def format_table(rows: list[Row], new_tokens: int) -> str:
    """The rows as an aligned plain-text table."""
    head = ("dtype", "engine", "tokens/s", "lmforge/HF", "vs HF fp32", "GB/s", "bandwidth %", "match HF",
            "step ms", "matmul / attention / other ms")
    body = [(r.dtype, r.engine, f"{r.tokens_per_s:.1f}",
             "-" if r.ratio_vs_hf is None else f"{r.ratio_vs_hf:.2f}x",
             "-" if r.ratio_vs_hf_fp32 is None else f"{r.ratio_vs_hf_fp32:.2f}x",
             f"{r.achieved_gb_s:.1f}", f"{100 * r.bandwidth_share:.1f}",
             "-" if r.matching_tokens is None else f"{r.matching_tokens}/{new_tokens}",
             "-" if r.split_ms is None else f"{r.split_ms[0]:.2f}",
             "-" if r.split_ms is None else " / ".join(f"{t:.2f}" for t in r.split_ms[1:])) for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    left = {0, 1}  # text columns left-aligned, numbers right-aligned

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


@contextlib.contextmanager
def int4_activations(value: str):
    """Run with `LMFORGE_INT4_ACT=value`: the CPU kernels are rebuilt from the setting on entry and on exit."""
    old = os.environ.get("LMFORGE_INT4_ACT")
    os.environ["LMFORGE_INT4_ACT"] = value
    cpu_gemv.kernel.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LMFORGE_INT4_ACT")
        else:
            os.environ["LMFORGE_INT4_ACT"] = old
        cpu_gemv.kernel.cache_clear()


def parse_args() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="smollm-135m", help="the model's shape (default smollm-135m)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="unquantized rows, comma-separated (default "
                                                                "float32,bfloat16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; best counts (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quant", default="int4", help="quantized bfloat16 rows, comma-separated: int4, int4-head (the "
                                                   "lm_head too), int4-q8 (int4 with int8 activations, "
                                                   "LMFORGE_INT4_ACT=int8), fp8, int8, int8-head, or '' for none "
                                                   "(default int4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128, 256),
                   help="int4 group size (default: fitted per layer, 128 or the largest that divides it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    args.quant = [q.strip() for q in args.quant.split(",") if q.strip()]
    if any(q not in QUANTS for q in args.quant):
        p.error(f"--quant takes {', '.join(QUANTS)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in args.dtypes):
        p.error(f"--dtypes takes {', '.join(DTYPES)}")
    if args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--new-tokens, --prompt-len and --repeats must be >= 1")
    if args.prompt_len + args.new_tokens > SHAPES[args.model]["max_position_embeddings"]:
        p.error("--prompt-len + --new-tokens exceeds the model's 2048 positions")
    return args


def main() -> None:
    """Measure bandwidth, run both engines in both dtypes and print the results."""
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth("cpu")
    model = build_model(args.model)
    ids = torch.randint(0, SHAPES[args.model]["vocab_size"], (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-decode-bench-") as work:
        for dtype in args.dtypes:
            rows += bench_dtype(model, dtype, ids, args.new_tokens, args.repeats, Path(work), bandwidth)
        for quant in args.quant:  # HF bf16 runs again beside each, for the same-conditions ratio
            with int4_activations("int8" if quant == "int4-q8" else "float"):
                row = bench_dtype(model, "bfloat16", ids, args.new_tokens, args.repeats, Path(work), bandwidth,
                                  quant.removesuffix("-q8").removesuffix("-head"), args.group_size,
                                  [] if quant.endswith("-head") else None)[1]
            row.engine += " (int8 act)" if quant == "int4-q8" else " (+lm_head)" if quant.endswith("-head") else ""
            rows.append(row)
    hf_fp32 = next((r.tokens_per_s for r in rows if r.engine == "HF eager" and r.dtype == "float32"), None)
    for r in rows:
        r.ratio_vs_hf_fp32 = r.tokens_per_s / hf_fp32 if hf_fp32 else None
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": args.model, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "bandwidth_gb_s": round(bandwidth / 1e9, 2), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats}
    if args.json:
        print(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2))
        return
    print(f"{meta['date']}  {args.model}  torch {meta['torch']}  transformers {meta['transformers']}  {meta['cpu']}  "
          f"{meta['threads']} threads  read bandwidth {meta['bandwidth_gb_s']:.1f} GB/s  "
          f"(prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats})")
    print(format_table(rows, args.new_tokens))


if __name__ == "__main__":
    main()
