"""Tensor-parallel generation throughput: tokens/s at each tp, and the share of time spent communicating.

What it measures: a SmolLM-135M-shaped Llama (random weights, seed 0; `--small` for a tiny one) optimized
once per tp (`lmforge.optimize(..., tp=N)`), then each artifact generating exactly N new tokens after a
random batch-1 prompt of P tokens (greedy), as the best of `--repeats` runs of `generate` (prefill + decode).
tp=1 runs in this process; tp>1 runs as N processes started by lmforge's launcher (gloo on the CPU, NCCL
on GPUs), each with cores/N threads on the CPU. In every rank the graph's collectives are timed:

    tokens/s        = N / seconds (rank 0's best run)
    comm ms/token   = time inside all-reduce and all-gather during that run / N
    comm share      = that time over the run's time
    bytes/token     = bytes all-reduced per generated token (from the artifact's manifest)

Run (from the repository root):

    python bench/tp.py [--tp 1,2] [--new-tokens 32] [--prompt-len 16] [--dtype bfloat16] [--device cpu]
                       [--repeats 3] [--small] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class TimedCommunicator:
    """Wraps a communicator, adding up the seconds spent in its collectives."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self.rank, self.world_size = inner.rank, inner.world_size

    def _timed(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - start
        return out

    def all_reduce(self, x):
        return self._timed(self.inner.all_reduce, x)

    def all_gather(self, x, dim):
        return self._timed(self.inner.all_gather, x, dim)

    def broadcast(self, x, src=0):
        return self._timed(self.inner.broadcast, x, src)


def measure(artifact: str, device: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Load `artifact` (this rank's shard under a launcher) and time greedy generation."""
    import lmforge
    from lmforge.codegen import collectives

    eng = lmforge.load(artifact, device=device)
    timer = None
    if eng.tp > 1:
        timer = TimedCommunicator(collectives.communicator())
        collectives.use_communicator(timer)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, eng.vocab_size, (1, prompt_len), generator=gen)
    eng.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1)  # warm-up
    best, comm = float("inf"), 0.0
    for _ in range(repeats):
        if timer:
            timer.seconds = 0.0
        sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        eng.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1)
        sync()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, comm = seconds, (timer.seconds if timer else 0.0)
    return {"tp": eng.tp, "rank": eng.rank, "seconds": best, "comm_seconds": comm}


def worker(argv: list[str]) -> None:
    artifact, device, prompt_len, new_tokens, repeats, out = argv
    cores = os.cpu_count() or 1
    if device == "cpu":
        torch.set_num_threads(max(1, cores // int(os.environ.get("WORLD_SIZE", "1"))))
    result = measure(artifact, device, int(prompt_len), int(new_tokens), int(repeats))
    if result["rank"] == 0:
        Path(out).write_text(json.dumps(result))


def build_model(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from decode_cpu import SMOLLM_135M

        config = dict(SMOLLM_135M, num_attention_heads=8, num_key_value_heads=2, hidden_size=576,
                      intermediate_size=1536)  # 8 heads of 72 (SmolLM has 9, which 2 ranks cannot split)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config, dtype="float32")).eval()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="a tiny model (the test suite's smoke run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sizes = [int(t) for t in args.tp.split(",")]

    import lmforge
    from lmforge.ir.tensor_parallel import TensorParallelSummary
    from lmforge.runtime.launch import launch

    model = build_model(args.small)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for tp in sizes:
            art = Path(work) / f"tp{tp}"
            lmforge.optimize(model, art, dtype=args.dtype, max_seq_len=args.prompt_len + args.new_tokens + 1, tp=tp)
            manifest = json.loads((art / "manifest.json").read_text())
            info = TensorParallelSummary.from_json(manifest.get("tensor_parallel"))
            common = [str(art), args.device, str(args.prompt_len), str(args.new_tokens), str(args.repeats)]
            if tp == 1:
                result = measure(*common[:2], args.prompt_len, args.new_tokens, args.repeats)
            else:
                out = Path(work) / f"result{tp}.json"
                env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")])}
                os.environ.update(env)
                code = launch(["--worker", *common, str(out)], tp, module="tp")
                if code != 0:
                    raise SystemExit(f"tp={tp}: the ranks failed with exit status {code}")
                result = json.loads(out.read_text())
            rows.append({"tp": tp, "tokens_per_s": args.new_tokens / result["seconds"],
                         "comm_ms_per_token": 1000 * result["comm_seconds"] / args.new_tokens,
                         "comm_share": result["comm_seconds"] / result["seconds"],
                         "all_reduces_per_step": info.all_reduces_per_step if info else 0,
                         "bytes_all_reduced_per_token": info.bytes_all_reduced_per_token if info else 0})
    base = rows[0]["tokens_per_s"] if rows and rows[0]["tp"] == 1 else None
    if args.json:
        print(json.dumps({"date": datetime.date.today().isoformat(), "device": args.device, "dtype": args.dtype,
                          "rows": rows}, indent=2))
        return
    print(f"tensor-parallel greedy generation, {'tiny' if args.small else 'SmolLM-135M-shaped (8 heads)'} Llama, "
          f"{args.dtype}, {args.device}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          f"({datetime.date.today().isoformat()}, {os.cpu_count()} cores, torch {torch.__version__})")
    print("| tp | tokens/s | vs tp 1 | comm ms/token | comm share | all-reduces/step | bytes all-reduced/token |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['tp']} | {r['tokens_per_s']:.1f} | {speed} | {r['comm_ms_per_token']:.2f} | "
              f"{100 * r['comm_share']:.0f} % | {r['all_reduces_per_step']} | {r['bytes_all_reduced_per_token']} |")


if __name__ == "__main__":
    main()
