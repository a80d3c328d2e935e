"""The CPU decode kernels: `cpu/gemv.c`, `cpu/gemv_f32.c`, `cpu/norm.c`, `cpu/int4.c`, `cpu/int4_q8.c`,
`cpu/int8.c`, `cpu/dequant.c`, `cpu/amx.c` and `cpu/attention.c`,
built on first use with the machine's C compiler, with `cpu/program.c`, which runs a recorded list of their calls
(`cpu_program.py`).

    kernel()(x, w, b=None) -> y          x (..., K) bfloat16 or float32 with at most MAX_ROWS rows, w (N, K), b (N,)
                                         of x's dtype: y (..., N) (gemv.c, gemv_f32.c)
    kernel().rms_norm(x, w, eps) -> y    x (..., K), w (K,), bfloat16 or float32: RMSNorm in float32, rounded once
    kernel().add_rms_norm(a, b, w, eps) -> (y, s)   s = a + b, y = rms_norm(s, w, eps) (norm.c)
    kernel().rotary(x, cos, sin) -> y    x (B, H, S, D), cos/sin (B, 1|H, S, D) bfloat16: rotate-half rotary
    kernel().glu(gate, up, act) -> y     gate, up (..., K) bfloat16: bf16(bf16(act(gate)) * up), or float32:
                                         act(gate) * up; act "silu" or "gelu_tanh" (`GLU_ACTS`)
    kernel().int4(x, qweight, scales, zeros, group_size, bias=None) -> y
                                         x (..., K) bfloat16 or float32, any number of rows; int4 weights
                                         qweight (N, K // 2) uint8 (column 2j in the low nibble of byte j),
                                         scales and zeros (N, K // group_size) float32 (zeros None: all 8);
                                         with `LMFORGE_INT4_ACT=int8` (`int4_activations()`), calls of up to
                                         Q8_MAX_ROWS rows quantize x to int8 per 32 columns (int4_q8.c)
    kernel().int8(x, qweight, scales, bias=None) -> y
                                         x (..., K) bfloat16 or float32, any number of rows; qweight (N, K) int8,
                                         scales (N,) float32: y = scales * (x @ qweight^T) + bias (int8.c)
    kernel().dequant_int4(qweight, scales, zeros, group_size, n0, n1, out), kernel().dequant_int8(qweight, scales,
                          n0, n1, out)   weight rows n0..n1 dequantized into out, bfloat16 or float32 (dequant.c;
                                         the prefill routes of `cpu_route.py`)
    kernel().amx(x, w, scales=None, zeros=None, group_size=0, bias=None) -> y
                                         bfloat16 x with many rows against bfloat16, int4 or int8 weights on AMX
                                         tiles, where `kernel().amx_available` (amx.c; `cpu_route.py`)
    kernel().attention(q, k, v, k_cache, v_cache, mask, scale, window) -> out
    kernel().qkv_attention(qkv, cos, sin, k_cache, v_cache, mask, q_heads, kv_heads, head_dim, v_head_dim, scale,
                           window) -> out
                                         `lmforge::attention` and `lmforge::qkv_attention` for one new token per
                                         row (attention.c)

Why: a decode step multiplies one row of activations by every weight, so it is bound by how fast the
weights stream from memory. PyTorch's bfloat16 one-row matmul (oneDNN) reads about 11-17 GB/s on a
2-core AVX-512 EPYC whose memory gives 35; this kernel reads 26-33 GB/s there (`bench/decode_cpu.py`).

The source is compiled once per machine with `-O3 -march=native -fopenmp -ffp-contract=off` into a shared library cached
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
SOURCES = tuple(SOURCE.with_name(name) for name in ("gemv.c", "gemv_f32.c", "norm.c", "int4.c", "int4_q8.c",
                                                     "int8.c", "dequant.c", "amx.c", "attention.c",
                                                     "program.c"))
HEADERS = tuple(SOURCE.with_name(name) for name in ("bf16.h", "vmath.h", "rows.h", "dequant.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")  # products rounded as PyTorch rounds them
MAX_ROWS = 8  # GEMV_MAX_ROWS in gemv.c
Q8_MAX_ROWS = 8  # Q8_MAX_ROWS in int4_q8.c
INT4_ACTIVATIONS = ("int8", "float")  # LMFORGE_INT4_ACT: what an int4 decode GEMV multiplies the codes with
ATTN_MAX_HEAD_DIM = 512  # in attention.c
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes gemm_int4 takes
INT4_SCALE_DTYPES = (torch.float32, torch.bfloat16)  # its scales and zero points: both one of these
_QUANT_X_DTYPES = (torch.bfloat16, torch.float32)
GEMV_DTYPES = (torch.bfloat16, torch.float32)  # gemv_bf16 (gemv.c), gemv_f32 (gemv_f32.c)
GLU_ACTS = ("silu", "gelu_tanh")  # the activations glu_*_bf16 and glu_*_f32 in gemv.c compute
GLU_DTYPES = (torch.bfloat16, torch.float32)
AMX_BF16, AMX_INT4, AMX_INT8 = 0, 1, 2  # amx_matmul's kinds of weight (amx.c)


def int4_activations() -> str:
    """`LMFORGE_INT4_ACT`: "int8" quantizes the activations of an int4 decode GEMV (up to Q8_MAX_ROWS
    rows) to int8 per 32 columns and multiplies in integers (int4_q8.c); "float" (the default) keeps them in their dtype
    (gemm_int4 in int4.c, also what any larger batch and a CPU without AVX512-VNNI use)."""
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
        f32 = self.lib.gemv_f32
        f32.restype, f32.argtypes = ctypes.c_int, fn.argtypes
        self._gemv = {torch.bfloat16: fn, torch.float32: f32}
        norm = self.lib.rms_norm_rows
        norm.restype = ctypes.c_int
        norm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        self._norm = norm
        add_norm = self.lib.add_rms_norm_rows
        add_norm.restype = ctypes.c_int
        add_norm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_int64]
        self._add_norm = add_norm
        rot = self.lib.rotary_bf16
        rot.restype = ctypes.c_int
        rot.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + \
            [ctypes.c_void_p] + [ctypes.c_int64] * 4
        self._rotary = rot
        self._glu = {}
        for act in GLU_ACTS:
            for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
                glu = getattr(self.lib, f"glu_{act}_{suffix}")
                glu.restype = ctypes.c_int
                glu.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + \
                    [ctypes.c_int64] * 3
                self._glu[act, dtype] = glu
        q4 = self.lib.gemm_int4
        q4.restype = ctypes.c_int
        q4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] + \
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_int]
        self._int4 = q4
        q8 = self.lib.gemv_int4_q8
        q8.restype = ctypes.c_int
        q8.argtypes = q4.argtypes
        self._int4_q8 = q8
        i8 = self.lib.gemm_int8
        i8.restype = ctypes.c_int
        i8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + \
            [ctypes.c_int]
        self._int8 = i8
        dq4 = self.lib.dequant_int4
        dq4.restype = ctypes.c_int
        dq4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int,
                                                                                          ctypes.c_int]
        dq8 = self.lib.dequant_int8
        dq8.restype = ctypes.c_int
        dq8.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._dequant_int4, self._dequant_int8 = dq4, dq8
        amx = self.lib.amx_matmul
        amx.restype = ctypes.c_int
        amx.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + \
            [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]
        self._amx = amx
        att = self.lib.attention_decode
        att.restype = ctypes.c_int
        att.argtypes = [ctypes.c_int] + ([ctypes.c_void_p] + [ctypes.c_int64] * 2) * 3 + \
            ([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 2 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                                            ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 8 + [ctypes.c_int]
        self._attention = att
        qkv = self.lib.qkv_attention_decode
        qkv.restype = ctypes.c_int
        qkv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + \
            ([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 2 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                                            ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_int]
        self._qkv_attention = qkv
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
        self._glu[act, gate.dtype](g.data_ptr(), ldg, u.data_ptr(), ldu, y.data_ptr(), K, M, K)
        return y

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, mask: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        """`lmforge::attention` for one new token per row (`cpu/attention.c`): writes k, v into the caches' last
        slot and attends; the caller checks `supports_attention(...)` first (this is the hot path)."""
        B, Hq, _, D = q.shape
        _, Hkv, L, Dv = v_cache.shape
        out = q.new_empty((B, 1, Hq, Dv)).transpose(1, 2)  # laid out as SDPA's output is
        ks, vs = k_cache.stride(), v_cache.stride()
        err = self._attention(q.dtype == torch.bfloat16, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(),
                              k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), k_cache.data_ptr(),
                              ks[0], ks[1], ks[2], v_cache.data_ptr(), vs[0], vs[1], vs[2], mask.data_ptr(),
                              mask.stride(0), scale, window, out.data_ptr(), Hq * Dv, Dv, B, Hq, Hkv, L, D, Dv,
                              torch.get_num_threads())
        if err:
            raise MemoryError(f"attention_decode: no memory for the scores of {L} keys") if err == -2 else \
                ValueError(f"attention_decode: sizes it does not take ({Hq=} {Hkv=} {D=} {Dv=})")
        return out

    def qkv_attention(self, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, q_heads: int, kv_heads: int,
                      head_dim: int, v_head_dim: int, scale: float, window: int) -> torch.Tensor:
        """`lmforge::qkv_attention` for one new token per row (`cpu/attention.c`): rotary on q and k (unless cos is
        None), k and v into the caches' last slot, attention; out (B, 1, Hq * Dv). The caller checks
        `qkv_attention.kernel_takes(...)` first (this is the hot path)."""
        B = qkv.shape[0]
        L = k_cache.shape[2]
        out = torch.empty((B, 1, q_heads * v_head_dim), dtype=qkv.dtype)
        ks, vs = k_cache.stride(), v_cache.stride()
        rotate = cos is not None
        err = self._qkv_attention(qkv.dtype == torch.bfloat16, qkv.data_ptr(), qkv.stride(0),
                                  cos.data_ptr() if rotate else None, sin.data_ptr() if rotate else None,
                                  cos.stride(0) if rotate and cos.shape[0] > 1 else 0, k_cache.data_ptr(), ks[0], ks[1],
                                  ks[2], v_cache.data_ptr(), vs[0], vs[1], vs[2], mask.data_ptr(), mask.stride(0), scale,
                                  window, out.data_ptr(), B, q_heads, kv_heads, L, head_dim, v_head_dim,
                                  torch.get_num_threads())
        if err:
            raise MemoryError(f"qkv_attention_decode: no memory for the scores of {L} keys") if err == -2 else \
                ValueError(f"qkv_attention_decode: sizes it does not take ({q_heads=} {kv_heads=} {head_dim=})")
        return out

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """w * x / sqrt(mean(x^2) + eps) over the last dim, in float32, rounded once (norm.c); x and w both
        bfloat16 or both float32, w contiguous."""
        K = x.shape[-1]
        x2, ldx = _rows(x, K)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._norm(x.dtype == torch.bfloat16, x2.data_ptr(), ldx, w.data_ptr(), eps, y.data_ptr(), K, x.numel() // K, K)
        return y

    def add_rms_norm(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float):
        """(rms_norm(s, w, eps), s) with s = a + b rounded to their dtype (norm.c); a, b of one shape and, with w,
        one dtype (bfloat16 or float32), w contiguous."""
        K = a.shape[-1]
        a2, lda = _rows(a, K)
        b2, ldb = _rows(b, K)
        y = torch.empty_like(a, memory_format=torch.contiguous_format)
        s = torch.empty_like(a, memory_format=torch.contiguous_format)
        self._add_norm(a.dtype == torch.bfloat16, a2.data_ptr(), lda, b2.data_ptr(), ldb, w.data_ptr(), eps,
                       y.data_ptr(), s.data_ptr(), a.numel() // K, K)
        return y, s

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, w, b)`; the caller checks `supports(x, w, b)` first (this is the hot path)."""
        N, K = w.shape
        x2, ldx = _rows(x, K)
        M = x.numel() // K
        y = x.new_empty((*x.shape[:-1], N))
        if self._gemv[x.dtype](x2.data_ptr(), ldx, w.data_ptr(), None if b is None else b.data_ptr(),
                               y.data_ptr(), N, M, N, K, torch.get_num_threads()):
            raise ValueError(f"gemv: {M} rows of x, the kernel takes 1..{MAX_ROWS}")
        return y

    def int4_q8_for(self, rows: int) -> bool:
        """Does an int4 call with `rows` rows of x run int4_q8.c (int8 activations) rather than gemm_int4?"""
        return self.int8_activations and rows <= Q8_MAX_ROWS

    def int4(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, w, bias)` with w (N, K) stored as int4 codes, for any number of rows of x:

            w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
            q[n, 2j] = qweight[n, j] & 15,  q[n, 2j + 1] = qweight[n, j] >> 4

        x (..., K) bfloat16 or float32; qweight (N, K // 2) uint8; scales, zeros (N, K // group_size)
        both float32 or both bfloat16, zeros None meaning 8; bias (N,) in x's dtype. Accumulates in float32 and returns y
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
        fn = self._int4_q8 if self.int4_q8_for(M) else self._int4
        err = fn(x2.data_ptr(), ldx, x.dtype == torch.float32, qweight.data_ptr(), scales.data_ptr(),
                 None if zeros is None else zeros.data_ptr(), scales.dtype == torch.bfloat16,
                 None if bias is None else bias.data_ptr(), y.data_ptr(), N, M, N, K, group_size, torch.get_num_threads())
        if err == -1:
            raise ValueError(f"gemm_int4: group_size must be one of {INT4_GROUP_SIZES} and divide K, got "
                             f"{group_size=} {K=}")
        if err:
            raise MemoryError(f"gemm_int4: no memory for its copy of x ({M} x {K})")
        return y

    def int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, qweight * scales[:, None], bias)` for any number of rows of x (int8.c): x (..., K) bfloat16
        or float32; qweight (N, K) int8; scales (N,) float32; bias (N,) in x's dtype. Sums in float32 and returns
        y (..., N) in x's dtype. The caller checks `supports_int8(...)` first (this is the hot path)."""
        N, K = qweight.shape
        x2, ldx = _rows(x, K)
        M = x.numel() // K
        y = x.new_empty((*x.shape[:-1], N))
        err = self._int8(x2.data_ptr(), ldx, x.dtype == torch.float32, qweight.data_ptr(), scales.data_ptr(),
                         None if bias is None else bias.data_ptr(), y.data_ptr(), N, M, N, K, torch.get_num_threads())
        if err:
            raise MemoryError(f"gemm_int8: no memory for its copy of x ({M} x {K})") if err == -2 else \
                ValueError(f"gemm_int8: sizes it does not take ({M=} {N=} {K=})")
        return y

    def dequant_int4(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                     n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows n0..n1 of the int4 weight `Kernel.int4` multiplies with, dequantized into `out` ((n1 - n0, K)
        contiguous, bfloat16 or float32): (q - zeros) * scales in float32, rounded once (dequant.c)."""
        K = qweight.shape[1] * 2
        if self._dequant_int4(qweight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(),
                              scales.dtype == torch.bfloat16, group_size, K, n0, n1, out.data_ptr(),
                              out.dtype == torch.bfloat16, torch.get_num_threads()):
            raise ValueError(f"dequant_int4: sizes it does not take ({group_size=} {K=} {n0=} {n1=})")
        return out

    def dequant_int8(self, qweight: torch.Tensor, scales: torch.Tensor, n0: int, n1: int,
                     out: torch.Tensor) -> torch.Tensor:
        """Rows n0..n1 of the int8 weight, qweight * scales[:, None] rounded once, into `out` ((n1 - n0, K)
        contiguous, bfloat16 or float32) (dequant.c)."""
        K = qweight.shape[1]
        if self._dequant_int8(qweight.data_ptr(), scales.data_ptr(), K, n0, n1, out.data_ptr(),
                              out.dtype == torch.bfloat16, torch.get_num_threads()):
            raise ValueError(f"dequant_int8: sizes it does not take ({K=} {n0=} {n1=})")
        return out

    @functools.cached_property
    def amx_available(self) -> bool:
        """Has this build AMX, and may this process use it (amx.c asks Linux for the tile state once)?"""
        return bool(self.lib.amx_available())

    def amx(self, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
            zeros: torch.Tensor | None = None, group_size: int = 0, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear(x, W, bias)` on AMX tiles (amx.c) for bfloat16 x (..., K): W is w itself ((N, K) bfloat16), int4
        codes (w (N, K // 2) uint8 with `scales`, `zeros`, `group_size` as `int4` takes them) or int8 codes (w (N, K)
        int8 with float32 `scales` (N,)), dequantized to bfloat16 first. The caller checks `amx_available` and the
        operands (`supports`, `supports_int4`, `supports_int8`) first."""
        kind = {torch.bfloat16: AMX_BF16, torch.uint8: AMX_INT4, torch.int8: AMX_INT8}[w.dtype]
        N, K = w.shape[0], x.shape[-1]
        x2, ldx = _rows(x, K)
        M = x.numel() // K
        y = x.new_empty((*x.shape[:-1], N))
        err = self._amx(kind, x2.data_ptr(), ldx, w.data_ptr(), None if scales is None else scales.data_ptr(),
                        None if zeros is None else zeros.data_ptr(), scales is not None and scales.dtype == torch.bfloat16,
                        group_size, None if bias is None else bias.data_ptr(), y.data_ptr(), N, M, N, K,
                        torch.get_num_threads())
        if err:
            raise MemoryError(f"amx_matmul: no memory for its copies of x ({M} x {K})") if err == -2 else \
                ValueError(f"amx_matmul: a call it does not take ({M=} {N=} {K=} {group_size=})")
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
    zeros unless None) (N, K // group_size) contiguous, both float32 or both bfloat16 (INT4_SCALE_DTYPES); bias None
    or (N,) in x's dtype, contiguous."""
    if not (x.dtype in _QUANT_X_DTYPES and qweight.dtype == torch.uint8 and qweight.dim() == 2 and x.dim() >= 1
            and group_size in INT4_GROUP_SIZES and qweight.is_contiguous() and scales is not None):
        return False
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != K or K == 0 or K % group_size != 0 or not x.is_cpu or not qweight.is_cpu:
        return False
    groups = (N, K // group_size)
    if scales.dtype not in INT4_SCALE_DTYPES:
        return False
    for t in (scales, zeros):
        if t is not None and not (t.dtype == scales.dtype and t.shape == groups and t.is_contiguous() and t.is_cpu):
            return False
    return bias is None or (bias.dtype == x.dtype and bias.shape == (N,) and bias.is_contiguous()
                            and bias.is_cpu)


def supports_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> bool:
    """Can `Kernel.int8` compute this call? CPU tensors; x bfloat16 or float32 (..., K); qweight (N, K) int8
    contiguous, K > 0; scales (N,) float32 contiguous; bias None or (N,) in x's dtype, contiguous."""
    if not (x.dtype in _QUANT_X_DTYPES and qweight.dtype == torch.int8 and qweight.dim() == 2 and x.dim() >= 1
            and qweight.is_contiguous() and x.is_cpu and qweight.is_cpu):
        return False
    N, K = qweight.shape
    if x.shape[-1] != K or K == 0:
        return False
    if not (scales.dtype == torch.float32 and scales.shape == (N,) and scales.is_contiguous() and scales.is_cpu):
        return False
    return bias is None or (bias.dtype == x.dtype and bias.shape == (N,) and bias.is_contiguous() and bias.is_cpu)


def supports_attention(q, k, v, k_cache, v_cache, mask, causal: bool) -> bool:
    """Can `Kernel.attention` compute this call? One causal query per row; q, k, v and the caches all float32 or
    all bfloat16 on the CPU, each with its last dim contiguous; head dims up to ATTN_MAX_HEAD_DIM; an int64
    mask (B, L) with contiguous rows."""
    if not causal or q.shape[2] != 1 or not q.is_cpu or mask.dtype != torch.int64:
        return False
    dtype = q.dtype
    if dtype not in (torch.float32, torch.bfloat16) or max(q.shape[-1], v_cache.shape[-1]) > ATTN_MAX_HEAD_DIM:
        return False
    tensors = (q, k, v, k_cache, v_cache)
    B, Hq, _, D = q.shape
    Hkv = k_cache.shape[1]
    return (all(t.dtype == dtype and t.stride(-1) == 1 for t in tensors) and Hkv > 0 and Hq % Hkv == 0
            and k.shape == (B, Hkv, 1, D) and k_cache.shape[0] == B and k_cache.shape[-1] == D
            and v.shape == (B, Hkv, 1, v_cache.shape[-1])
            and v_cache.shape[:3] == k_cache.shape[:3] and mask.stride(-1) == 1 and mask.shape == (B, k_cache.shape[2]))


def supports(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Can the kernel compute `linear(x, w, b)`? bfloat16 or float32 CPU tensors of one dtype, w (N, K)
    contiguous, few rows."""
    return (x.dtype == w.dtype and x.dtype in GEMV_DTYPES and x.is_cpu and w.is_cpu
            and w.dim() == 2 and w.is_contiguous() and x.shape[-1] == w.shape[1]
            and 0 < x.numel() // max(1, w.shape[1]) <= MAX_ROWS
            and (b is None or (b.dtype == x.dtype and b.is_contiguous() and b.shape == (w.shape[0],))))


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
