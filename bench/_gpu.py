"""What the GPU benchmark scripts share: their flags, the GPU check, the timer and the bandwidth they
report shares of. `bench/attention.py` and `bench/quant_gemm.py` import it (run from the repository root,
`bench/` is on the path)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch


def setup(doc: str, script: str) -> tuple[argparse.Namespace, torch.device, Callable, float]:
    """Parse `--quick`, `--json` and `--smoke`; return (args, device, do_bench, read bandwidth in bytes/s).

    On a GPU, `do_bench` is Triton's (median ms). `--smoke` under `TRITON_INTERPRET=1` runs on the CPU with
    one timed call per function: it checks the script, not the speed."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="A few shapes only.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of a table.")
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny shapes, on the CPU under TRITON_INTERPRET=1 too: checks the script, not the speed.")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit(f"{script} needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    from lmforge.runtime.measure import memory_bandwidth

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        from triton.testing import do_bench
    else:
        def do_bench(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    bandwidth = memory_bandwidth(dev, nbytes=1 << 31 if dev.type == "cuda" else 1 << 24)
    return args, dev, do_bench, bandwidth
