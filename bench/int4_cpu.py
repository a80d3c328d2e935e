"""lmforge's CPU int4 decode GEMVs side by side: activations in their own dtype (`gemm_int4`, cpu/int4.c) against
activations quantized to int8 per 32 columns (`gemv_int4_q8`, cpu/int4_q8.c, `LMFORGE_INT4_ACT=int8`).

Shapes (N, K) of a SmolLM-135M-shaped Llama (fused q/k/v, fused gate/up, down, the tied lm_head) and of a
Llama-1B-shaped one; bfloat16 x, batch rows M (default 1), group size 64 (SmolLM's 576 columns) or 128, float
zero points. Each shape's weights are cycled through `--copies` distinct copies (more bytes than the caches
hold), so the weights stream from memory as in a decode step; the two kernels run alternately, round by round,
and each one's best round counts:

    us      = seconds per call (Python's call overhead included: what the engine pays)
    GB/s    = (packed codes + scales and zeros, bfloat16 or float32 per --scales) / seconds
    speedup = float path's time / int8 path's time

Run (from the repository root): python bench/int4_cpu.py [--rows 1] [--rounds 5] [--copies 16] [--scales bfloat16]
                                [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from lmforge.codegen import cpu_gemv
from lmforge.runtime.measure import memory_bandwidth

SHAPES = {  # name: (N, K, group size)
    "smollm q/k/v": (960, 576, 64), "smollm gate/up": (3072, 576, 64), "smollm down": (576, 1536, 64),
    "smollm lm_head": (49152, 576, 64), "llama-1b q/k/v": (3072, 2048, 128), "llama-1b gate/up": (16384, 2048, 128),
    "llama-1b down": (2048, 8192, 128),
}


def weights(N: int, K: int, G: int, copies: int, gen: torch.Generator, dtype: torch.dtype):
    return [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
             (torch.rand(N, K // G, generator=gen) * 0.05 + 0.01).to(dtype),
             (torch.rand(N, K // G, generator=gen) * 15).to(dtype)) for _ in range(copies)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1, help=f"rows of x, 1..{cpu_gemv.Q8_MAX_ROWS} (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; best counts (default 5)")
    p.add_argument("--copies", type=int, default=16, help="distinct weight copies cycled per round (default 16)")
    p.add_argument("--scales", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the scales' and zero points' dtype (default bfloat16, what a bfloat16 engine holds)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if not 1 <= args.rows <= cpu_gemv.Q8_MAX_ROWS or args.rounds < 1 or args.copies < 1:
        p.error(f"--rows must be 1..{cpu_gemv.Q8_MAX_ROWS}; --rounds and --copies >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    k = cpu_gemv.kernel()
    if k is None or not k.lib.int4_q8_available():
        raise SystemExit("int4_cpu: needs the CPU kernels built with AVX512-VNNI")
    gen = torch.Generator().manual_seed(0)
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"{torch.get_num_threads()} threads  kernel isa {k.isa}  read bandwidth {memory_bandwidth('cpu') / 1e9:.1f} GB/s"
          f"  (M = {args.rows}, best of {args.rounds} rounds over {args.copies} copies)")
    print("| shape (N, K, group) | float us | float GB/s | int8 us | int8 GB/s | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (N, K, G) in SHAPES.items():
        ws = weights(N, K, G, args.copies, gen, getattr(torch, args.scales))
        x = torch.randn(args.rows, K, generator=gen).bfloat16()
        nbytes = N * K // 2 + 2 * N * (K // G) * (2 if args.scales == "bfloat16" else 4)
        best = {True: float("inf"), False: float("inf")}
        for r in range(args.rounds + 1):  # round 0 warms up
            for int8 in (False, True):
                k.int8_activations = int8
                start = time.perf_counter()
                for q, s, z in ws:
                    k.int4(x, q, s, z, G)
                if r:
                    best[int8] = min(best[int8], (time.perf_counter() - start) / len(ws))
        f, i = best[False], best[True]
        print(f"| {name} ({N}, {K}, {G}) | {f * 1e6:.1f} | {nbytes / f / 1e9:.1f} | {i * 1e6:.1f} | "
              f"{nbytes / i / 1e9:.1f} | {f / i:.2f}x |")
    k.int8_activations = cpu_gemv.int4_activations() == "int8"


if __name__ == "__main__":
    main()
