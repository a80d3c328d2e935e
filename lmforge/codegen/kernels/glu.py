"""Triton GLU kernel: a gated MLP's `act(gate) * up`, elementwise, following `lmforge::glu`:

    gate, up  (M, F)  rows with a stride (the halves of a split gate_up projection), the last dim contiguous;
                      one dtype: float16, bfloat16 or float32
    y         (M, F)  contiguous, in that dtype

    act  silu       g * sigmoid(g)                                  = g / (1 + exp(-g))
         gelu       0.5 g (1 + erf(g / sqrt(2)))
         gelu_tanh  0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))  = g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3)))

act(gate) is computed in float32 and rounded to the dtype before the product, which is rounded again: the
two roundings of PyTorch's `act(gate) * up` in a half dtype (in float32 both are no-ops).

Grid (M, cdiv(F, BLOCK)): one block of one row per program; offsets are int64 (a prefill's M * F can pass
2^31). Autotuned per power-of-two bucket of F; under `TRITON_INTERPRET=1` (the CPU) one small block runs,
so tests cover several blocks and a tail.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # the kernel's ACT
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --- autotune configurations, as data -----------------------------------------------------------------

if INTERPRET:
    CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=1, num_stages=1)]
else:  # pragma: no cover - GPU only
    CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1)
               for b, w in [(512, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8)]]


# --- kernel -------------------------------------------------------------------------------------------


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE, to nearest even, kept in float32. bfloat16 by its bits: Triton's interpreter
    truncates `.to(tl.bfloat16)` where the GPU rounds to nearest even; the bits give both the GPU's result."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.autotune(configs=CONFIGS, key=["F_BUCKET", "ACT"], cache_results=True)
@triton.jit
def _glu_kernel(G, U, Y, sg_m, su_m, F, F_BUCKET, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (M, cdiv(F, BLOCK)): y[m, f] = round(round(act(g[m, f])) * u[m, f]) for one block of row m."""
    m = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    g = tl.load(G + m * sg_m + f, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + m * su_m + f, mask=ok, other=0.0)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        a = g / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    a = _round(a, Y.dtype.element_ty)  # act(gate) in the activations' dtype, as PyTorch rounds it
    y = _round(a * u.to(tl.float32), Y.dtype.element_ty)
    tl.store(Y + m * F + f, y.to(Y.dtype.element_ty), mask=ok)  # exact: y already holds a DTYPE value


# --- launcher -----------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (..., F) as (M, F) rows with a stride and the last dim contiguous (a view where it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up; gate and up (..., F) of one shape and dtype (DTYPES); the result likewise, contiguous."""
    if act not in ACT_IDS:
        raise ValueError(f"glu: act must be one of {', '.join(ACT_IDS)}, got {act!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in DTYPES:
        raise ValueError(f"glu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must have "
                         f"one shape and one dtype of {', '.join(str(d) for d in DTYPES)}")
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    F = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    grid = lambda meta: (g2.shape[0], triton.cdiv(F, meta["BLOCK"]))  # noqa: E731
    _glu_kernel[grid](g2, u2, y, g2.stride(0), u2.stride(0), F, triton.next_power_of_2(F), ACT=ACT_IDS[act])
    return y
