"""`lmforge::linear`: `torch.nn.functional.linear` that sends decode-shaped bfloat16 CPU calls to our GEMV.

    linear(x, w, b=None) -> y       x (..., K), w (N, K), b (N,) -> y (..., N); exactly F.linear's contract

The runtime puts it in place of `aten.linear` at load time when it measures it faster (see
`runtime/layout.py`); the artifact itself keeps `aten.linear`. bfloat16 calls go to AMX tiles where the CPU has
them and `cpu_route.py` measures that faster for the call's rows; other calls the GEMV cannot take (other dtypes,
more than `cpu_gemv.MAX_ROWS` rows) go to `F.linear`, as do all calls off the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv, cpu_route
from lmforge.ir.ops import LinearForm, OpFacts, register_op
from lmforge.ir.verify import same_float_dtype

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor")


def _linear_cpu(x, w, b=None):
    kernel = cpu_gemv.kernel()
    if kernel is not None:
        if cpu_route.amx_takes_linear(kernel, x, w, b):
            return kernel.amx(x, w, bias=b)
        if cpu_gemv.supports(x, w, b):
            return kernel(x, w, b)
    return F.linear(x, w, b)


def _record_linear(b, x, w, bias=None):
    """The GEMV (or AMX) call `_linear_cpu` makes, for a step program (`cpu_program.py`)."""
    rows = b.rows(x)
    if rows is None or not cpu_gemv.supports(x, w, bias):
        return None
    (M, ldx), (N, K) = rows, w.shape
    y = b.out((*x.shape[:-1], N), x.dtype)
    if cpu_route.amx_takes_linear(b.kernel, x, w, bias):
        b.call("amx", (x, w, None, None, bias, y), (cpu_gemv.AMX_BF16, ldx, 0, 0, N, M, N, K, b.threads))
        return y
    kind = "gemv_bf16" if x.dtype == torch.bfloat16 else "gemv_f32"
    b.call(kind, (x, w, bias, y), (ldx, N, M, N, K, b.threads))
    return y


_lib.impl("linear", _linear_cpu, "CPU")
_lib.impl("linear", lambda x, w, b=None: F.linear(x, w, b), "CUDA")


@torch.library.register_fake("lmforge::linear")
def _linear_fake(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


linear = torch.ops.lmforge.linear.default

register_op(linear, OpFacts(
    shard="linear", verify=("matmul-dtypes", same_float_dtype(0, 1, 2)), cpu=_linear_cpu, record=_record_linear,
    cost=lambda node: (2 * math.prod(node.args[1].meta["spec"].shape), 0),
    linear=lambda node: LinearForm(0, ((1, 0, 1, "col"),), 2),  # as aten.linear: w (N, K)
))
