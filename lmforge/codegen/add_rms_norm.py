"""`lmforge::add_rms_norm`: the residual add and the RMSNorm that reads it, as one op.

    add_rms_norm(x, residual, weight, eps, out_dtype, cast_before_weight=False) -> (y, s)

    s = x + residual                                    in their dtype (the residual stream the layer passes on)
    y = rms_norm(s, weight, eps, out_dtype, cast_before_weight)          (`codegen/rms_norm.py`)

x and residual have one shape and one dtype. Each transformer layer of a pre-norm model runs it twice, and
the final norm once: `h = x + attn(x); n = norm(h)`. It is ONNX Runtime's SkipSimplifiedLayerNormalization
(whose `input_skip_bias_sum` output is s), which the ONNX exporter can map it to.

The CPU runs decode-sized bfloat16 and float32 rows through `cpu/norm.c`'s `add_rms_norm_rows` (one call for
the add and the norm); everything else, and every other device, runs the PyTorch reference below.
"""

from __future__ import annotations

import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen import rms_norm as norm
from lmforge.ir.ops import OpFacts, register_op

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, ScalarType out_dtype, "
            "bool cast_before_weight=False) -> (Tensor, Tensor)")


def reference(x, residual, weight, eps: float, out_dtype: torch.dtype, cast_before_weight: bool = False):
    s = x + residual
    return norm.reference(s, weight, eps, out_dtype, cast_before_weight), s


def _kernel_takes(x, residual, weight, out_dtype, cast_before_weight) -> bool:
    """Does `cpu/norm.c`'s add_rms_norm_rows compute this call? The norm's rows, and a residual laid out like x."""
    return (norm.kernel_takes(x, weight, out_dtype, cast_before_weight) and residual.dtype == x.dtype
            and residual.shape == x.shape)


def _add_rms_norm_cpu(x, residual, weight, eps, out_dtype, cast_before_weight=False):
    kernel = cpu_gemv.kernel()
    if kernel is not None and _kernel_takes(x, residual, weight, out_dtype, cast_before_weight):
        return kernel.add_rms_norm(x, residual, weight, eps)
    return reference(x, residual, weight, eps, out_dtype, cast_before_weight)


def _record_add_rms_norm(b, x, residual, weight, eps, out_dtype, cast_before_weight=False):
    """The norm.c call `_add_rms_norm_cpu` makes, for a step program (`cpu_program.py`): returns (y, s)."""
    a, r = b.rows(x), b.rows(residual)
    if a is None or r is None or not _kernel_takes(x, residual, weight, out_dtype, cast_before_weight):
        return None
    y, s = b.out(x.shape, x.dtype), b.out(x.shape, x.dtype)
    b.call("add_rms_norm", (x, residual, weight, y, s), (x.dtype == torch.bfloat16, a[1], r[1], a[0], x.shape[-1]), (eps,))
    return y, s


_lib.impl("add_rms_norm", _add_rms_norm_cpu, "CPU")
_lib.impl("add_rms_norm", reference, "CUDA")


@torch.library.register_fake("lmforge::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, out_dtype, cast_before_weight=False):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape)


add_rms_norm = torch.ops.lmforge.add_rms_norm.default

# "replicated": the residual stream it reads is replicated under tensor parallelism; a sharded input would
# keep the layers it came from whole, with the reason
register_op(add_rms_norm, OpFacts(shard="replicated", cpu=_add_rms_norm_cpu,
                                            record=_record_add_rms_norm))
