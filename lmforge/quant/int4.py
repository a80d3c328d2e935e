"""int4 weight-only quantization: group-wise, asymmetric by default, packed two values per byte.

A linear weight W (N, K) becomes three tensors (`Int4Weight`):

    qdata   (N, K // 2)   uint8      byte j of row n holds q[n, 2j] in its low nibble, q[n, 2j+1] in its high
    scales  (N, K // G)   float      one per group of G consecutive input columns, in the compute dtype
    zeros   (N, K // G)   float      zero points in the same dtype; None when symmetric (every zero point is 8)

    W[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G],    q unsigned in 0..15

This is ONNX `MatMulNBits` (bits=4, block_size=G) with its per-row blocks laid end to end, and the same
numbers as the compressed-tensors `pack-quantized` scheme (there packed eight to an int32): an exporter
reshapes and re-types, it never re-quantizes. Zero points are floats (fractional ones are what min/max
rounding and HQQ give); a format that holds only integer zero points needs them rounded.

Methods (`Int4Config.method`), all from torchao's quantization primitives:
- `rtn`: round to nearest. Asymmetric: scale = (max - min) / 15 over the group and zero point -min / scale,
  left fractional (torchao's `_choose_qparams_affine_tinygemm`, the parameters of its own int4 weight-only
  scheme, and `_quantize_affine_tinygemm`); symmetric: scale = max|w| / 7.5, q = round(w / scale) + 8
  in 0..15 (`choose_qparams_affine` with `MappingType.SYMMETRIC`). `zero_points="int"` rounds the zero
  point to an integer instead (`choose_qparams_affine` with `MappingType.ASYMMETRIC`, quant range 0..15),
  which costs 0.3% perplexity on the demo model at group size 128.
- `hqq`: Half-Quadratic Quantization's calibration-free search (torchao's
  `_choose_qparams_and_quantize_affine_hqq`): starts from min/max, then alternates rounding and a
  closed-form update of the float zero points that minimises an l_p (p < 1) reconstruction error.
  Asymmetric only.
- `checkpoint`: not a method lmforge runs; the mark of layers whose numbers came from a quantized checkpoint
  (`compressed_tensors.py`), however that was made.

`Int4Scheme` is the scheme's handler (see `scheme.py`): the quantize pass emits `lmforge::int4_linear(x,
qweight, scales, zeros, group_size, bias)` with these tensors, scales and zeros as "parameter" weights so
that convert-dtype puts them in the compute dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lmforge.errors import LmforgeError
from lmforge.ir.ops import LinearForm
from lmforge.quant.primitives import torchao_primitives
from lmforge.quant.scheme import PackedTensor, QuantScheme, register_scheme

GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("rtn", "hqq")
IMPORTED = "checkpoint"  # the method of layers read from a quantized checkpoint: its numbers, however made
ZERO_POINTS = ("float", "int")


@dataclass(frozen=True)
class Int4Config:
    """Scheme `int4`, version 1."""

    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    # asymmetric only: "float" keeps min/max's fractional zero points; "int" rounds them to 0..15 (what
    # compressed-tensors, GGUF and ONNX's uint8 zero points hold), the scales still from min/max. Readers
    # that predate the setting dequantize either the same way: zeros are floats in both.
    zero_points: str = "float"
    version: int = 1

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise LmforgeError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                               f"got {self.group_size}")
        if self.method not in (*METHODS, IMPORTED):
            raise LmforgeError(f"int4 method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.symmetric and self.method == "hqq":
            raise LmforgeError("int4 method 'hqq' optimises zero points, so it is asymmetric only")
        if self.zero_points not in ZERO_POINTS:
            raise LmforgeError(f"int4 zero points must be one of {', '.join(ZERO_POINTS)}, got {self.zero_points!r}")
        if self.zero_points == "int" and self.method == "hqq":
            raise LmforgeError("int4 method 'hqq' optimises fractional zero points; integer zero points need 'rtn'")

    def unsuitable(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of `shape` cannot take this scheme, or None."""
        if len(shape) != 2:
            return f"a {len(shape)}-D weight"
        if shape[1] % self.group_size:
            fits = [g for g in GROUP_SIZES if shape[1] % g == 0]
            hint = f" (group size {fits[-1]} would fit)" if fits else ""
            return f"in_features {shape[1]} is not a multiple of the group size {self.group_size}{hint}"
        return None


@dataclass
class Int4Weight:
    qdata: torch.Tensor  # (N, K // 2) uint8
    scales: torch.Tensor  # (N, K // G) float
    zeros: torch.Tensor | None  # (N, K // G) float, or None: symmetric, zero point 8
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qdata.shape[0], self.qdata.shape[1] * 2


def pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in 0..15 -> (N, K // 2) uint8, even columns in the low nibbles."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(qdata: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 in 0..15; the inverse of `pack`."""
    return torch.stack((qdata & 0xF, qdata >> 4), dim=-1).reshape(qdata.shape[0], -1)


def dequantize(p: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the packed tensors stand for, computed in float32 and returned in `dtype`."""
    q = unpack(p.qdata).float()
    scales = p.scales.float().repeat_interleave(p.group_size, dim=1)
    zeros = 8.0 if p.zeros is None else p.zeros.float().repeat_interleave(p.group_size, dim=1)
    return ((q - zeros) * scales).to(dtype)


def quantize(w: torch.Tensor, cfg: Int4Config, dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantize a 2-D weight by `cfg`; scales and zeros in `dtype` (default: the weight's dtype)."""
    problem = cfg.unsuitable(tuple(w.shape))
    if problem:
        raise LmforgeError(f"cannot quantize a weight of shape {tuple(w.shape)} to int4: {problem}")
    if cfg.method == IMPORTED:
        raise LmforgeError("int4 method 'checkpoint' marks layers imported from a quantized checkpoint; quantize "
                           f"with one of {', '.join(METHODS)}")
    dtype = dtype or w.dtype
    ao = torchao_primitives()
    w32 = w.detach().float()
    N, K = w32.shape
    G = cfg.group_size
    block = (1, G)
    if cfg.method == "hqq":
        q, scales, zeros, _ = ao._choose_qparams_and_quantize_affine_hqq(
            w32, nbits=4, group_size=G, axis=1, compute_dtype=torch.float32, device=str(w32.device),
            raw_output=True)
        return Int4Weight(pack(q.reshape(N, K)), scales.reshape(N, K // G).to(dtype),
                          zeros.reshape(N, K // G).to(dtype), G)
    if cfg.symmetric:
        scales, zeros = ao.choose_qparams_affine(w32, ao.MappingType.SYMMETRIC, block, torch.int8, quant_min=-8,
                                                 quant_max=7, eps=1e-12, scale_dtype=torch.float32)
        scales = _stored(scales.reshape(N, K // G), dtype)
        q = ao.quantize_affine(w32, block, scales.float(), zeros.reshape(N, K // G), torch.int8, -8, 7)
        return Int4Weight(pack(q.to(torch.int16) + 8), scales, None, G)
    if cfg.zero_points == "int":  # min/max's scale, its zero point rounded to an integer in 0..15
        scales, zeros = ao.choose_qparams_affine(w32, ao.MappingType.ASYMMETRIC, block, torch.uint8, quant_min=0,
                                                 quant_max=15, eps=1e-12, scale_dtype=torch.float32)
        scales = _stored(scales.reshape(N, K // G), dtype)
        zeros = zeros.reshape(N, K // G)
        q = ao.quantize_affine(w32, block, scales.float(), zeros, torch.uint8, 0, 15)
        return Int4Weight(pack(q), scales, zeros.to(dtype), G)
    # min/max over the group, zero point -min / scale kept fractional: torchao's tinygemm parameters, whose
    # float-domain zero zf = min + 8 * scale is our zero point (8 - zf / scale) in the other domain
    scales, zf = ao._choose_qparams_affine_tinygemm(w32, ao.MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                    1e-12, torch.float32, torch.float32)
    scales = scales.reshape(N, K // G)
    stored = _stored(scales, dtype)
    zeros = ((8 * scales - zf.reshape(N, K // G)) / stored.float()).to(dtype)
    # q = round(w / scale + zero) against the stored (rounded) scale and zero point, so the two agree
    q = ao._quantize_affine_tinygemm(w32, block, stored.float(), (8 - zeros.float()) * stored.float(), torch.int32,
                                     0, 15)
    return Int4Weight(pack(q), stored, zeros, G)


def _stored(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scales as the artifact will hold them; q is computed from these rounded values, so the two agree."""
    return scales.to(dtype).clamp(min=torch.finfo(dtype).tiny)


# override tokens (rules.py) other than g<group size>
_TOKENS = {"sym": ("symmetric", True), "asym": ("symmetric", False), "rtn": ("method", "rtn"), "hqq": ("method", "hqq"),
           "izp": ("zero_points", "int"), "fzp": ("zero_points", "float")}


@register_scheme
class Int4Scheme(QuantScheme):
    name = "int4"
    config = Int4Config
    op_name = "int4_linear"
    layout = {
        "tensors": {"<layer>.qweight": "(N, K/2) uint8: q[n, 2j] in the low nibble of byte j, q[n, 2j+1] in the high",
                    "<layer>.scales": "(N, K/G) compute dtype",
                    "<layer>.zeros": "(N, K/G) compute dtype; absent when symmetric (zero point 8)"},
        "dequantize": "W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], q unsigned 0..15",
        "compatible_with": "ONNX MatMulNBits (bits=4, block_size=G, blocks of a row end to end)",
    }
    token_help = (*(f"g{g}" for g in GROUP_SIZES), *_TOKENS)

    def fit(self, cfg: Int4Config, shape: tuple[int, ...], chosen: frozenset[str]) -> Int4Config:
        """A group size the user did not choose is the default (128) where it divides in_features, else the
        largest supported one that does (576 -> 64), so that `--quant int4` quantizes every layer it can."""
        if "group_size" in chosen or len(shape) != 2 or shape[1] % cfg.group_size == 0:
            return cfg
        fits = [g for g in GROUP_SIZES if shape[1] % g == 0]
        return dataclasses.replace(cfg, group_size=fits[-1]) if fits else cfg

    def label(self, described: dict[str, Any]) -> str:
        sym = "sym" if described["symmetric"] else "asym"
        if not described["symmetric"] and described.get("zero_points", "float") == "int":
            sym += " int-zp"
        return f"int4 g{described['group_size']} {sym} {described['method']}"

    def parse_token(self, token: str) -> tuple[str, Any] | None:
        if token.startswith("g") and token[1:].isdigit():  # any number: the config names the sizes it takes
            return "group_size", int(token[1:])
        return _TOKENS.get(token)

    def pack(self, w: torch.Tensor, cfg: Int4Config, dtype: torch.dtype) -> list[PackedTensor]:
        p = quantize(w, cfg, dtype=dtype)
        return [PackedTensor("qweight", p.qdata), PackedTensor("scales", p.scales), PackedTensor("zeros", p.zeros)]

    def dequantize(self, tensors: dict[str, torch.Tensor], cfg: Int4Config) -> torch.Tensor:
        return dequantize(Int4Weight(tensors["qweight"], tensors["scales"], tensors.get("zeros"), cfg.group_size))

    def op_args(self, x: fx.Node, tensors: list[fx.Node | None], cfg: Int4Config, bias: Any) -> tuple:
        qweight, scales, zeros = tensors
        return x, qweight, scales, zeros, cfg.group_size, bias

    def linear_form(self, node: fx.Node) -> LinearForm:
        # qweight's input axis holds two columns a byte, scales' and zeros' one group of columns an element
        zeros = ((3, 0, 1, "group"),) if node.args[3] is not None else ()
        return LinearForm(0, ((1, 0, 1, "byte"), (2, 0, 1, "group"), *zeros), 5, group=int(node.args[4]))
