"""`lmforge::linear`: `torch.nn.functional.linear` that sends decode-shaped bfloat16 CPU calls to our GEMV.

    linear(x, w, b=None) -> y       x (..., K), w (N, K), b (N,) -> y (..., N); exactly F.linear's contract

The runtime puts it in place of `aten.linear` at load time when it measures it faster (see
`runtime/layout.py`); the artifact itself keeps `aten.linear`. Calls the kernel cannot take (other dtypes,
more than `cpu_gemv.MAX_ROWS` rows, a prefill) go to `F.linear`, as do all calls off the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor")


def _linear_cpu(x, w, b=None):
    kernel = cpu_gemv.kernel()
    if kernel is not None and cpu_gemv.supports(x, w, b):
        return kernel(x, w, b)
    return F.linear(x, w, b)


_lib.impl("linear", _linear_cpu, "CPU")
_lib.impl("linear", lambda x, w, b=None: F.linear(x, w, b), "CUDA")


@torch.library.register_fake("lmforge::linear")
def _linear_fake(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


linear = torch.ops.lmforge.linear.default
