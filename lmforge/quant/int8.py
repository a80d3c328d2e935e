"""int8 weight-only quantization: one symmetric scale per output channel, activations left as they are.

A linear weight W (N, K) becomes two tensors (`Int8Weight`):

    qdata   (N, K)   int8       round(W / scale), in -127..127 (the symmetric range: -128 is never used)
    scale   (N,)     float32    max |W[n, :]| / 127

    W[n, k] ~= qdata[n, k] * scale[n],     y[m, n] = scale[n] * sum_k x[m, k] * qdata[n, k] + bias[n]

Half the bytes of bfloat16 per weight, and the activations keep the compute dtype (no per-token rounding as
fp8's has), so the quality stays close to bfloat16. The math is torchao's: `choose_qparams_affine` and
`quantize_affine` with `MappingType.SYMMETRIC` over blocks of one whole row. The same two tensors are the
compressed-tensors 8-bit `pack-quantized` scheme (symmetric, channel strategy, weight-only: W8A16), as
`lmforge export --format hf` writes it.

`Int8Scheme` is the scheme's handler (see `scheme.py`): the quantize pass emits `lmforge::int8_linear(x,
qweight, scales, bias)`, the scales a "buffer" weight so that convert-dtype leaves them float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lmforge.errors import LmforgeError
from lmforge.ir.ops import LinearForm
from lmforge.quant.primitives import torchao_primitives
from lmforge.quant.scheme import PackedTensor, QuantScheme, register_scheme

QMAX = 127  # codes in -QMAX..QMAX
EPS = 1e-12  # floor of max |row| / QMAX, so an all-zero row gets a finite scale


@dataclass(frozen=True)
class Int8Config:
    """Scheme `int8`, version 1: int8 weights, per-output-channel symmetric float32 scales, float activations."""

    version: int = 1

    def unsuitable(self, shape: tuple[int, ...]) -> str | None:
        return f"a {len(shape)}-D weight" if len(shape) != 2 else None


@dataclass
class Int8Weight:
    qdata: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) float32


def quantize(w: torch.Tensor, cfg: Int8Config | None = None) -> Int8Weight:
    problem = (cfg or Int8Config()).unsuitable(tuple(w.shape))
    if problem:
        raise LmforgeError(f"cannot quantize a weight of shape {tuple(w.shape)} to int8: {problem}")
    ao = torchao_primitives()
    w32 = w.detach().float()
    block = (1, w32.shape[1])
    scale, zero = ao.choose_qparams_affine(w32, ao.MappingType.SYMMETRIC, block, torch.int8, quant_min=-QMAX,
                                           quant_max=QMAX, eps=EPS, scale_dtype=torch.float32)
    q = ao.quantize_affine(w32, block, scale, zero, torch.int8, -QMAX, QMAX)
    return Int8Weight(q, scale.reshape(-1).float())


def dequantize(p: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (p.qdata.float() * p.scale.float()[:, None]).to(dtype)


@register_scheme
class Int8Scheme(QuantScheme):
    name = "int8"
    config = Int8Config
    op_name = "int8_linear"
    layout = {
        "tensors": {"<layer>.qweight": "(N, K) int8, -127..127", "<layer>.scales": "(N,) float32"},
        "dequantize": "W[n, k] = qweight[n, k] * scales[n]; activations stay in the compute dtype",
        "compatible_with": "compressed-tensors pack-quantized (8 bits, symmetric, channel strategy, weight-only)",
    }

    def pack(self, w: torch.Tensor, cfg: Int8Config, dtype: torch.dtype) -> list[PackedTensor]:
        p = quantize(w, cfg)  # the scales stay float32 whatever the compute dtype: a "buffer" weight
        return [PackedTensor("qweight", p.qdata), PackedTensor("scales", p.scale, kind="buffer")]

    def dequantize(self, tensors: dict[str, torch.Tensor], cfg: Int8Config) -> torch.Tensor:
        return dequantize(Int8Weight(tensors["qweight"], tensors["scales"]))

    def op_args(self, x: fx.Node, tensors: list[fx.Node | None], cfg: Int8Config, bias: Any) -> tuple:
        qweight, scales = tensors
        return x, qweight, scales, bias

    def linear_form(self, node: fx.Node) -> LinearForm:
        # the weight's columns are the input features; the per-row scales have no input axis
        return LinearForm(0, ((1, 0, 1, "col"), (2, 0, None, "col")), 3)
