"""`lmforge::rms_norm`: RMSNorm as one op.

    rms_norm(x, weight, eps, out_dtype, cast_before_weight=False) -> y      x (..., K), weight (K,), y (..., K)

    x32 = x.float();  n = x32 * rsqrt(mean(x32^2, -1) + eps)
    y = (weight.float() * n).to(out_dtype)              cast_before_weight=False  (one rounding)
    y = weight * n.to(x.dtype), in out_dtype            cast_before_weight=True   (Hugging Face's bf16 order)

The CPU runs decode-sized bfloat16 and float32 rows through `cpu/norm.c` (one rounding); everything else,
and every other device, runs the PyTorch reference below.
"""

from __future__ import annotations

import torch

from lmforge.codegen import cpu_gemv
from lmforge.ir.ops import OpFacts, register_op

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype, bool cast_before_weight=False) "
            "-> Tensor")
KERNEL_MAX_ROWS = 64
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def reference(x, weight, eps: float, out_dtype: torch.dtype, cast_before_weight: bool = False):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return (weight * normed.to(x.dtype)).to(out_dtype)
    return (weight.float() * normed).to(out_dtype)


def kernel_takes(x, weight, out_dtype, cast_before_weight: bool) -> bool:
    """Do `cpu/norm.c`'s rows compute this norm? Decode-sized CPU rows, x, weight and the output of one dtype
    (bfloat16 or float32), weight first (one rounding), the weight one contiguous value per feature."""
    return (not cast_before_weight and x.dtype == weight.dtype == out_dtype and x.dtype in _KERNEL_DTYPES
            and weight.dim() == 1 and weight.is_contiguous() and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]
            and x.is_cpu)


def _rms_norm_cpu(x, weight, eps, out_dtype, cast_before_weight=False):
    kernel = cpu_gemv.kernel()
    if kernel is not None and kernel_takes(x, weight, out_dtype, cast_before_weight):
        return kernel.rms_norm(x, weight, eps)
    return reference(x, weight, eps, out_dtype, cast_before_weight)


def _record_rms_norm(b, x, weight, eps, out_dtype, cast_before_weight=False):
    """The norm.c call `_rms_norm_cpu` makes, for a step program (`cpu_program.py`)."""
    rows = b.rows(x)
    if rows is None or not kernel_takes(x, weight, out_dtype, cast_before_weight):
        return None
    (M, ldx), K = rows, x.shape[-1]
    y = b.out(x.shape, x.dtype)
    b.call("rms_norm", (x, weight, y), (x.dtype == torch.bfloat16, ldx, K, M, K), (eps,))
    return y


_lib.impl("rms_norm", _rms_norm_cpu, "CPU")
_lib.impl("rms_norm", reference, "CUDA")


@torch.library.register_fake("lmforge::rms_norm")
def _rms_norm_fake(x, weight, eps, out_dtype, cast_before_weight=False):
    return x.new_empty(x.shape, dtype=out_dtype)


rms_norm = torch.ops.lmforge.rms_norm.default

register_op(rms_norm, OpFacts(shard="norm", cpu=_rms_norm_cpu, record=_record_rms_norm))
