"""Prefill-sized int4 and int8 matmuls on the CPU: dequantize the weight a chunk of rows at a time and multiply with
PyTorch's matmul.

The int4 and int8 kernels (`cpu/int4.c`, `cpu/int8.c`) are built for decode, where one to eight rows of x meet
every weight once and the weight's bytes set the time. With many rows of x (a prompt, a batch of 16) the matmul
is bound by arithmetic instead, and PyTorch's bfloat16 matmul (oneDNN: AMX tiles where the CPU has them, else
AVX512-BF16) does it several times faster than those kernels. So such a call dequantizes `CHUNK_BYTES` of weight
rows at a time into a buffer that stays in cache (`cpu/dequant.c`: (q - zero) * scale in float32, rounded once to
x's dtype) and multiplies x with each chunk there; the dequantizing costs once per call, spread over all rows of x.

Measured on a 2-core Xeon with AMX (2026-12-04, 2 threads), the linears of 30 SmolLM-135M layers with 32 rows of
bfloat16 x, weights read from memory: bfloat16 weights 18.7 ms; int4 kernel 41.3 ms, dequantize + matmul 21.1 ms;
int8 kernel 50.3 ms, dequantize + matmul 22.7 ms.

The products differ from the kernels' by the rounding of each weight to x's dtype (for bfloat16 a relative 2^-9,
what Hugging Face computes with the dequantized weights); float32 x gets float32 weights.

Which way a call goes: calls with fewer than `MIN_ROWS` rows of x always take the kernels. From there
`route(scheme, dtype)` decides, measured once per process on a prefill-shaped probe (both ways, the faster by a
10 % margin, else the kernels), since the answer turns on the CPU (a CPU without AMX gains less from the matmul).
`LMFORGE_QUANT_PREFILL` set to `kernel` or `dequant` overrides the measure.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.errors import ArtifactError

ROUTES = ("kernel", "dequant")  # LMFORGE_QUANT_PREFILL, besides the default "auto"
MIN_ROWS = 16  # rows of x from which a call may take the dequantize-and-matmul route
CHUNK_BYTES = 4 << 20  # dequantized weight rows per matmul: measured best of 1, 2, 4 and 8 MiB on the Xeon
SCHEMES = ("int4", "int8")

_local = threading.local()  # each thread's chunk buffers, by dtype (an engine runs on one thread)


def forced_route() -> str | None:
    value = os.environ.get("LMFORGE_QUANT_PREFILL", "auto")
    if value == "auto":
        return None
    if value not in ROUTES:
        raise ArtifactError(f"LMFORGE_QUANT_PREFILL={value!r}: use auto, {' or '.join(ROUTES)}")
    return value


def use_dequant(kernel, scheme: str, x: torch.Tensor) -> bool:
    """Does this CPU call of `scheme` ("int4", "int8") with activations `x` take the dequantize-and-matmul route?"""
    if x.numel() < MIN_ROWS * x.shape[-1]:
        return False
    return (forced_route() or route(kernel, scheme, x.dtype)) == "dequant"


def int4_matmul(kernel, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`lmforge::int4_linear` by chunks of dequantized rows (arguments as `Kernel.int4` takes them)."""
    return _chunked(x, qweight.shape[0], qweight.shape[1] * 2, bias,
                    lambda n0, n1, out: kernel.dequant_int4(qweight, scales, zeros, group_size, n0, n1, out))


def int8_matmul(kernel, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`lmforge::int8_linear` by chunks of dequantized rows (arguments as `Kernel.int8` takes them)."""
    return _chunked(x, qweight.shape[0], qweight.shape[1], bias,
                    lambda n0, n1, out: kernel.dequant_int8(qweight, scales, n0, n1, out))


def _buffer(elements: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < elements:  # kept: a fresh buffer per call would fault its pages in each time
        buf = buffers[dtype] = torch.empty(elements, dtype=dtype)
    return buf


def _chunked(x: torch.Tensor, N: int, K: int, bias: torch.Tensor | None,
             fill: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    rows = max(1, min(N, CHUNK_BYTES // (K * x.element_size())))
    buf = _buffer(rows * K, x.dtype)
    if rows == N:
        y = F.linear(x2, fill(0, N, buf[:N * K].view(N, K)), bias)
    else:
        y = x2.new_empty((x2.shape[0], N))
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = fill(n0, n1, buf[:(n1 - n0) * K].view(n1 - n0, K))
            y[:, n0:n1] = F.linear(x2, w, None if bias is None else bias[n0:n1])
    return y.reshape(*x.shape[:-1], N)


def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def route(kernel, scheme: str, dtype: torch.dtype) -> str:
    """"dequant" where dequantize-and-matmul beats the kernel by 10 % on this machine for 32 rows of `dtype` x
    against eight SmolLM-sized (1536, 576) weights of `scheme`, else "kernel"."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 576, generator=gen).to(dtype)
    N, K = 1536, 576
    if scheme == "int4":
        args = [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
                 torch.rand(N, K // 64, generator=gen) / 64, None, 64) for _ in range(8)]
        ways = {"kernel": lambda: [kernel.int4(x, *a) for a in args],
                "dequant": lambda: [int4_matmul(kernel, x, *a) for a in args]}
    elif scheme == "int8":
        args = [(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen),
                 torch.rand(N, generator=gen) / 1024) for _ in range(8)]
        ways = {"kernel": lambda: [kernel.int8(x, *a) for a in args],
                "dequant": lambda: [int8_matmul(kernel, x, *a) for a in args]}
    else:
        raise ValueError(f"route: scheme must be one of {SCHEMES}, got {scheme!r}")
    times = {name: _best(fn) for name, fn in ways.items()}
    return "dequant" if times["dequant"] < 0.9 * times["kernel"] else "kernel"
