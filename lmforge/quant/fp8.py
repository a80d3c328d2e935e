"""fp8 dynamic quantization: float8 e4m3 weights with per-output-channel scales, activations per token.

A linear weight W (N, K) becomes (`Fp8Weight`):

    qdata   (N, K)   float8_e4m3fn     W / scale, rounded to nearest even and clamped to +-448
    scale   (N,)     float32           max |W[n, :]| / 448

At run time each row (token) of the activation x (M, K) is quantized the same way, with its own scale
s_x[m] = max |x[m, :]| / 448, and

    y[m, n] = s_x[m] * scale[n] * sum_k float(xq[m, k]) * float(qdata[n, k])

which is what `torch._scaled_mm` computes with row-wise scales (the compressed-tensors `float-quantized`
scheme with channel-wise weights and dynamic per-token activations stores the same two tensors). The math
is torchao's: `_choose_scale_float8` and `_quantize_affine_float8`.

`Fp8Scheme` is the scheme's handler (see `scheme.py`): the quantize pass emits `lmforge::fp8_linear(x,
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

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
EPS = 1e-12  # floor of max |row| so an all-zero row gets a finite scale


@dataclass(frozen=True)
class Fp8Config:
    """Scheme `fp8`, version 1: e4m3 weights, per-output-channel scales, dynamic per-token activations."""

    version: int = 1

    def unsuitable(self, shape: tuple[int, ...]) -> str | None:
        return f"a {len(shape)}-D weight" if len(shape) != 2 else None


@dataclass
class Fp8Weight:
    qdata: torch.Tensor  # (N, K) float8_e4m3fn
    scale: torch.Tensor  # (N,) float32


def quantize(w: torch.Tensor, cfg: Fp8Config | None = None) -> Fp8Weight:
    problem = (cfg or Fp8Config()).unsuitable(tuple(w.shape))
    if problem:
        raise LmforgeError(f"cannot quantize a weight of shape {tuple(w.shape)} to fp8: {problem}")
    ao = torchao_primitives()
    w32 = w.detach().float()
    scale = ao._choose_scale_float8(w32, [1, w32.shape[1]], FP8, hp_value_lb=EPS).reshape(-1)
    return Fp8Weight(ao._quantize_affine_float8(w32, scale[:, None], FP8), scale)


def dequantize(p: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (p.qdata.float() * p.scale.float()[:, None]).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization of x (..., K): (xq float8_e4m3fn, scale float32 (..., 1))."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@register_scheme
class Fp8Scheme(QuantScheme):
    name = "fp8"
    config = Fp8Config
    op_name = "fp8_linear"
    layout = {
        "tensors": {"<layer>.qweight": "(N, K) float8_e4m3fn", "<layer>.scales": "(N,) float32"},
        "dequantize": "W[n, k] = qweight[n, k] * scales[n]; activations quantized per token at run time "
                      "(scale = max|x[m, :]| / 448)",
        "compatible_with": "compressed-tensors float-quantized (channel weights, dynamic token activations)",
    }

    def pack(self, w: torch.Tensor, cfg: Fp8Config, dtype: torch.dtype) -> list[PackedTensor]:
        p = quantize(w, cfg)  # the scales stay float32 whatever the compute dtype: a "buffer" weight
        return [PackedTensor("qweight", p.qdata), PackedTensor("scales", p.scale, kind="buffer")]

    def dequantize(self, tensors: dict[str, torch.Tensor], cfg: Fp8Config) -> torch.Tensor:
        return dequantize(Fp8Weight(tensors["qweight"], tensors["scales"]))

    def op_args(self, x: fx.Node, tensors: list[fx.Node | None], cfg: Fp8Config, bias: Any) -> tuple:
        qweight, scales = tensors
        return x, qweight, scales, bias

    def linear_form(self, node: fx.Node) -> LinearForm:
        # the weight's columns are the input features; the per-row scales have no input axis
        return LinearForm(0, ((1, 0, 1, "col"), (2, 0, None, "col")), 3)
