"""Which way a CPU linear layer's call goes (bfloat16, int4 or int8 weights), and the ways besides the decode kernels.

- `kernel`: lmforge's decode kernels (`cpu/gemv.c` up to 8 rows of x; `cpu/int4.c`, `cpu/int8.c` any number).
- `amx` (`cpu/amx.c`): bfloat16 x on Intel AMX tiles, the weight read straight from its rows (bfloat16) or
  dequantized a block of 32 rows at a time into a buffer in cache (int4, int8); where the CPU has AMX and grants
  it, up to `AMX_MAX_ROWS` rows (past them oneDNN's blocking wins).
- `torch`: PyTorch's matmul (oneDNN; AMX where the CPU has it, else AVX512-BF16) for more than 8 rows, on
  quantized weights `CHUNK_BYTES` of rows at a time dequantized into a buffer that stays in cache (`cpu/dequant.c`).

Measured on a 2-core Xeon with AMX (2026-12-04, 2 threads), the linears of 30 SmolLM-135M layers (weights not in
the caches' nearer levels), milliseconds:

    rows  bf16 kernel / torch   amx    int4 kernel / torch   amx    int8 kernel / torch   amx
       1          10.3          8.9            3.5          5.7            3.6          7.8
       4          16.5          8.8            7.5          6.0            7.5          7.6
       8          32.6          8.6           13.3          5.8           14.0          8.1
      32          19.8         12.6     41.3 / 22.7         9.4     50.3 / 25.4         14.1

So which way wins turns on the rows and on the CPU: `ranking(kernel, scheme, dtype, rows)` orders the ways this
machine has for a bucket of rows (1, 2, 4, 8, many), timed once per process on a probe of that size, and a call
takes the first that applies. `LMFORGE_LINEAR_WAY` set to `kernel`, `torch` or `amx` overrides the measure where
that way applies. The step-program recorders (`cpu_program.py`) ask the same questions as the calls.

`torch` and int4's `amx` round each weight to bfloat16 first (relative 2^-9: what Hugging Face computes with
the dequantized weights; float32 x gets float32 weights, `torch` only); int8's `amx` multiplies the codes
themselves (exact in bfloat16) and scales the sums, as the int8 kernel does.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv
from lmforge.errors import ArtifactError

WAYS = ("kernel", "torch", "amx")  # LMFORGE_LINEAR_WAY, besides the default "auto"
SCHEMES = ("bf16", "int4", "int8")  # what `ranking` measures: a plain linear's weight dtype, or the scheme
AMX_MAX_ROWS = 256  # above, oneDNN (`torch`) multiplies faster than amx.c (SmolLM shapes, 512 rows: 1.1x)
CHUNK_BYTES = 4 << 20  # dequantized rows per `torch` matmul: measured best of 1, 2, 4 and 8 MiB on the Xeon

_local = threading.local()  # each thread's chunk buffers, by dtype (an engine runs on one thread)


def forced_way() -> str | None:
    value = os.environ.get("LMFORGE_LINEAR_WAY", "auto")
    if value == "auto":
        return None
    if value not in WAYS:
        raise ArtifactError(f"LMFORGE_LINEAR_WAY={value!r}: use auto, {', '.join(WAYS)}")
    return value


def rows_of(x) -> int:
    return math.prod(x.shape[:-1])


def bucket(rows: int) -> int:
    """The row count `ranking` measures for calls of `rows` rows: 1, 2, 4, 8 (the decode kernels' sizes) or 32."""
    return rows if rows <= 2 else 4 if rows <= 4 else 8 if rows <= cpu_gemv.MAX_ROWS else 32


def choose(kernel, scheme: str, x) -> str:
    """The way this CPU call of `scheme` with activations `x` (a tensor, or a step program's Ref) goes."""
    rows = rows_of(x)
    small = rows <= cpu_gemv.MAX_ROWS
    if small and not (x.dtype == torch.bfloat16 and kernel.amx_available):
        return "kernel"  # the decode kernels' sizes, and no other way to weigh against them
    ways = [w for w in ranking(kernel, scheme, x.dtype, bucket(rows)) if w != "amx" or rows <= AMX_MAX_ROWS]
    forced = forced_way()
    return forced if forced in ways else ways[0]


def amx_takes_linear(kernel, x, w, b=None) -> bool:
    """Does a plain bfloat16 linear (`lmforge::linear`) go to amx.c? Asked alike by the op and by its step-program
    recorder, of tensors or Refs."""
    return (x.dtype == w.dtype == torch.bfloat16 and kernel.amx_available and x.is_cpu and w.is_cpu and w.dim() == 2
            and w.is_contiguous() and len(x.shape) >= 1 and x.shape[-1] == w.shape[1] and w.shape[1] > 0
            and rows_of(x) > 0 and x.stride(-1) == 1
            and (b is None or (b.dtype == x.dtype and b.shape == (w.shape[0],) and b.is_contiguous()))
            and choose(kernel, "bf16", x) == "amx")


def int4_linear(kernel, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`lmforge::int4_linear` by this call's way, or None where that is the int4 kernel (arguments as `Kernel.int4`
    takes them, checked by `supports_int4`)."""
    way = choose(kernel, "int4", x)
    if way == "amx":
        return kernel.amx(x, qweight, scales, zeros, group_size, bias)
    if way == "torch":
        return _chunked(x, qweight.shape[0], qweight.shape[1] * 2, bias,
                        lambda n0, n1, out: kernel.dequant_int4(qweight, scales, zeros, group_size, n0, n1, out))
    return None


def int8_linear(kernel, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`lmforge::int8_linear` by this call's way, or None where that is the int8 kernel."""
    way = choose(kernel, "int8", x)
    if way == "amx":
        return kernel.amx(x, qweight, scales, bias=bias)
    if way == "torch":
        return _chunked(x, qweight.shape[0], qweight.shape[1], bias,
                        lambda n0, n1, out: kernel.dequant_int8(qweight, scales, n0, n1, out))
    return None


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
    """x @ W^T (+ bias), W made `CHUNK_BYTES` of rows at a time by fill(n0, n1, out)."""
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


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def ranking(kernel, scheme: str, dtype: torch.dtype, rows: int = 32) -> tuple[str, ...]:
    """The ways this machine has for `scheme` with `rows` rows of `dtype` x, fastest first: timed against SmolLM-sized
    (1536, 576) weights, eight of them for 32 rows (arithmetic-bound), 48 MiB of them for the decode kernels'
    sizes (bound by the weights' bytes)."""
    if scheme not in SCHEMES:
        raise ValueError(f"ranking: scheme must be one of {SCHEMES}, got {scheme!r}")
    gen = torch.Generator().manual_seed(0)
    N, K = 1536, 576
    x = torch.randn(rows, K, generator=gen).to(dtype)
    amx = dtype == torch.bfloat16 and kernel.amx_available
    small = rows <= cpu_gemv.MAX_ROWS
    weight_bytes = {"bf16": 2 * N * K, "int4": N * K // 2, "int8": N * K}[scheme]
    count = max(8, (48 << 20) // weight_bytes) if small else 8
    ways: dict[str, Callable[[], object]] = {}
    if scheme == "bf16":
        ws = [torch.randn(N, K, generator=gen).to(dtype) for _ in range(count)]
        if small:
            ways["kernel"] = lambda: [kernel(x, w) for w in ws]
        else:
            ways["torch"] = lambda: [F.linear(x, w) for w in ws]
        if amx:
            ways["amx"] = lambda: [kernel.amx(x, w) for w in ws]
    elif scheme == "int4":
        args = [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
                 torch.rand(N, K // 64, generator=gen) / 64, None, 64) for _ in range(count)]
        ways["kernel"] = lambda: [kernel.int4(x, *a) for a in args]
        if not small:
            ways["torch"] = lambda: [_chunked(x, N, K, None, lambda n0, n1, out, a=a: kernel.dequant_int4(
                a[0], a[1], a[2], a[3], n0, n1, out)) for a in args]
        if amx:
            ways["amx"] = lambda: [kernel.amx(x, *a) for a in args]
    else:
        args = [(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen),
                 torch.rand(N, generator=gen) / 1024) for _ in range(count)]
        ways["kernel"] = lambda: [kernel.int8(x, *a) for a in args]
        if not small:
            ways["torch"] = lambda: [_chunked(x, N, K, None, lambda n0, n1, out, a=a: kernel.dequant_int8(
                a[0], a[1], n0, n1, out)) for a in args]
        if amx:
            ways["amx"] = lambda: [kernel.amx(x, *a) for a in args]
    times = {name: best_seconds(fn) for name, fn in ways.items()}
    return tuple(sorted(times, key=times.get))
