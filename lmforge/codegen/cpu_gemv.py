"""The CPU decode kernels: `cpu/gemv.c` and `cpu/int4_q8.c`, built on first use with the machine's C compiler.

    kernel()(x, w, b=None) -> y          x (..., K) bfloat16 with at most MAX_ROWS rows, w (N, K), b (N,): y (..., N)
    kernel().rms_norm(x, w, eps) -> y    x (..., K) bfloat16, w (K,) bfloat16: RMSNorm in float32, rounded once
    kernel().rotary(x, cos, sin) -> y    x (B, H, S, D), cos/sin (B, 1|H, S, D) bfloat16: rotate-half rotary
    kernel().glu(gate, up, act) -> y     gate, up (..., K) bfloat16: bf16(bf16(act(gate)) * up), act "silu" or
                                         "gelu_tanh" (`GLU_ACTS`)
    kernel().int4(x, qweight, scales, zeros, group_size, bias=None) -> y
                                         x (..., K) bfloat16 or float32, any number of rows; int4 weights
                                         qweight (N, K // 2) uint8 (column 2j in the low nibble of byte j),
                                         scales and zeros (N, K // group_size) float32 (zeros None: all 8);
                                         with `LMFORGE_INT4_ACT=int8` (`int4_activations()`), calls of up to
                                         Q8_MAX_ROWS rows quantize x to int8 per 32 columns (int4_q8.c)

Why: a decode step multiplies one row of activations by every weight, so it is bound by how fast the
weights stream from memory. PyTorch's bfloat16 one-row matmul (oneDNN) reads about 11-17 GB/s on a
2-core AVX-512 EPYC whose memory gives 35; this kernel reads 26-33 GB/s there (`bench/decode_cpu.py`).

The source is compiled once per machine with `-O3 -march=native -fopenmp` into a shared library cached
under `$LMFORGE_CACHE_DIR` (default `~/.cache/lmforge`), named by a hash of the source, the compiler's
version and the flags, written to a temporary file and renamed (concurrent builds are safe). It is loaded
with ctypes; its OpenMP is the one torch already loaded, so the two share one thread pool. Without a C
compiler, or if the build fails, `available()` is False and callers use `torch.nn.functional.linear`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lmforge.errors import ArtifactError

SOURCE = Path(__file__).with_name("cpu") / "gemv.c"
SOURCES = (SOURCE, SOURCE.with_name("int4_q8.c"))  # compiled together into one library
HEADERS = (SOURCE.with_name("bf16.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 8  # GEMV_MAX_ROWS in gemv.c
Q8_MAX_ROWS = 8  # Q8_MAX_ROWS in int4_q8.c
INT4_ACTIVATIONS = ("int8", "float")  # LMFORGE_INT4_ACT: what an int4 decode GEMV multiplies the codes with
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes gemm_int4 takes
_INT4_X_DTYPES = (torch.bfloat16, torch.float32)
GLU_ACTS = ("silu", "gelu_tanh")  # the activations glu_*_bf16 in gemv.c compute


def int4_activations() -> str:
    """`LMFORGE_INT4_ACT`: "int8" quantizes the activations of an int4 decode GEMV (up to Q8_MAX_ROWS
    rows) to int8 per 32 columns and multiplies in integers (int4_q8.c); "float" (the default) keeps them in their dtype
    (gemm_int4 in gemv.c, also what any larger batch and a CPU without AVX512-VNNI use)."""
    value = os.environ.get("LMFORGE_INT4_ACT", "float")
    if value not in INT4_ACTIVATIONS:
        raise ArtifactError(f"LMFORGE_INT4_ACT={value!r}: use one of {', '.join(INT4_ACTIVATIONS)}")
    return value


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile gemv.c (if not cached) and return the library's path; raises RuntimeError on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    flags = FLAGS + tuple(extra_flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    native = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True).stdout
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, cc, version, native, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"gemv-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {', '.join(f.name for f in SOURCES)}: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Kernel:
    """One loaded build of gemv.c."""

    def __init__(self, path: Path):
        import torch  # noqa: F401  (torch's libgomp must be loaded first: the kernel then shares it)

        self.lib = ctypes.CDLL(str(path))
        self.lib.gemv_isa.restype = ctypes.c_char_p
        self.isa = self.lib.gemv_isa().decode()
        fn = self.lib.gemv_bf16
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._fn = fn
        norm = self.lib.rmsnorm_bf16
        norm.restype = ctypes.c_int
        norm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        self._norm = norm
        rot = self.lib.rotary_bf16
        rot.restype = ctypes.c_int
        rot.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + \
            [ctypes.c_void_p] + [ctypes.c_int64] * 4
        self._rotary = rot
        self._glu = {}
        for act in GLU_ACTS:
            glu = getattr(self.lib, f"glu_{act}_bf16")
            glu.restype = ctypes.c_int
            glu.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + \
                [ctypes.c_int64] * 3
            self._glu[act] = glu
        q4 = self.lib.gemm_int4
        q4.restype = ctypes.c_int
        q4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 5 + \
            [ctypes.c_int64] * 5 + [ctypes.c_int]
        self._int4 = q4
        q8 = self.lib.gemv_int4_q8
        q8.restype = ctypes.c_int
        q8.argtypes = q4.argtypes
        self._int4_q8 = q8
        # int4 decode with int8 activations (int4_q8.c), where the build has AVX512-VNNI
        self.int8_activations = bool(self.lib.int4_q8_available()) and int4_activations() == "int8"

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin with bfloat16 rounding after each op; x (B, H, S, D), cos and sin
        (B, 1 or H, S, D) with the same strides; all bfloat16 with the last dim contiguous."""
        B, H, S, D = x.shape
        out = x.new_empty((B, H, S, D))
        cb, ch, cs, _ = cos.stride()
        self._rotary(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
                     cb if cos.shape[0] > 1 else 0, ch if cos.shape[1] > 1 else 0, cs, out.data_ptr(), B, H, S, D)
        return out

    def glu(self, gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
        """bf16(bf16(act(gate)) * up), rounded after each op as PyTorch's `act(gate) * up` is; gate and up
        (..., K) bfloat16 of one shape, act in GLU_ACTS. Rows may have a stride (the halves of a split)."""
        K = gate.shape[-1]
        M = gate.numel() // K
        g, ldg = _rows(gate, K)
        u, ldu = _rows(up, K)
        y = torch.empty_like(gate, memory_format=torch.contiguous_format)
        self._glu[act](g.data_ptr(), ldg, u.data_ptr(), ldu, y.data_ptr(), K, M, K)
        return y

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """bf16(w * x / sqrt(mean(x^2) + eps)) over the last dim, in float32; x, w bfloat16, w contiguous."""
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = x.new_empty(x.shape)
        self._norm(x2.data_ptr(), x2.stride(0), w.data_ptr(), eps, y.data_ptr(), K, x2.shape[0], K)
        return y

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, w, b)`; the caller checks `supports(x, w, b)` first (this is the hot path)."""
        N, K = w.shape
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = x.new_empty((*x.shape[:-1], N))
        if self._fn(x2.data_ptr(), x2.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), N,
                    M, N, K, torch.get_num_threads()):
            raise ValueError(f"gemv: {M} rows of x, the kernel takes 1..{MAX_ROWS}")
        return y

    def int4(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, w, bias)` with w (N, K) stored as int4 codes, for any number of rows of x:

            w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
            q[n, 2j] = qweight[n, j] & 15,  q[n, 2j + 1] = qweight[n, j] >> 4

        x (..., K) bfloat16 or float32; qweight (N, K // 2) uint8; scales, zeros (N, K // group_size)
        float32, zeros None meaning 8; bias (N,) in x's dtype. Accumulates in float32 and returns y
        (..., N) in x's dtype. The caller checks `supports_int4(...)` first (this is the hot path)."""
        N, K = qweight.shape[0], qweight.shape[1] * 2
        if x.is_contiguous():  # the common case, without the cost of a reshape
            x2, M, ldx = x, x.numel() // K, K
        else:
            x2 = x.reshape(-1, K)  # (M, K), rows with a stride
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            M, ldx = x2.shape[0], x2.stride(0)
        y = x.new_empty((*x.shape[:-1], N))
        fn = self._int4_q8 if self.int8_activations and M <= Q8_MAX_ROWS else self._int4
        err = fn(x2.data_ptr(), ldx, x.dtype == torch.float32, qweight.data_ptr(), scales.data_ptr(),
                         None if zeros is None else zeros.data_ptr(), None if bias is None else bias.data_ptr(),
                         y.data_ptr(), N, M, N, K, group_size, torch.get_num_threads())
        if err == -1:
            raise ValueError(f"gemm_int4: group_size must be one of {INT4_GROUP_SIZES} and divide K, got "
                             f"{group_size=} {K=}")
        if err:
            raise MemoryError(f"gemm_int4: no memory for its copy of x ({M} x {K})")
        return y


def _rows(t: torch.Tensor, K: int) -> tuple[torch.Tensor, int]:
    """`t` (..., K) as rows of K contiguous elements: (tensor, row stride in elements)."""
    if t.is_contiguous():  # the common case, without the cost of a reshape
        return t, K
    t2 = t.reshape(-1, K)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def supports_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  group_size: int, bias: torch.Tensor | None = None) -> bool:
    """Can `Kernel.int4` compute this call? CPU tensors; x bfloat16 or float32 with K = 2 * qweight.shape[1]
    columns; qweight (N, K // 2) uint8 contiguous; group_size in INT4_GROUP_SIZES dividing K; scales (and
    zeros unless None) (N, K // group_size) float32 contiguous; bias None or (N,) in x's dtype, contiguous."""
    if not (x.dtype in _INT4_X_DTYPES and qweight.dtype == torch.uint8 and qweight.dim() == 2 and x.dim() >= 1
            and group_size in INT4_GROUP_SIZES and qweight.is_contiguous() and scales is not None):
        return False
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != K or K == 0 or K % group_size != 0 or x.device.type != "cpu" or qweight.device.type != "cpu":
        return False
    groups = (N, K // group_size)
    for t in (scales, zeros):
        if t is not None and not (t.dtype == torch.float32 and t.shape == groups and t.is_contiguous()
                                  and t.device.type == "cpu"):
            return False
    return bias is None or (bias.dtype == x.dtype and bias.shape == (N,) and bias.is_contiguous()
                            and bias.device.type == "cpu")


def supports(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Can the kernel compute `linear(x, w, b)`? bfloat16 CPU tensors, w (N, K) contiguous, few rows."""
    return (x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and w.device.type == "cpu"
            and w.dim() == 2 and w.is_contiguous() and x.shape[-1] == w.shape[1]
            and 0 < x.numel() // max(1, w.shape[1]) <= MAX_ROWS
            and (b is None or (b.dtype == torch.bfloat16 and b.is_contiguous() and b.shape == (w.shape[0],))))


@functools.lru_cache(maxsize=None)
def kernel() -> Kernel | None:
    """The machine's build, or None when it cannot be built (no compiler, unsupported platform)."""
    if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0":
        return None
    try:
        return Kernel(build())
    except (RuntimeError, OSError):
        return None


def available() -> bool:
    return kernel() is not None
