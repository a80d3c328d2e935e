"""`lmforge::rotary`: the rotate-half rotary embedding as one op.

    rotary(x, cos, sin) -> x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin
        x (B, H, S, D); cos, sin broadcastable to x (typically (B, 1, S, D)); the result has x's shape and the
        dtype PyTorch's type promotion gives those ops

Its reference is exactly those ops, so a rewrite to it changes nothing numerically. The CPU runs
decode-sized bfloat16 calls through `cpu/gemv.c`'s `rotary_bf16`, which rounds to bfloat16 after each op
as PyTorch does; everything else runs the reference.
"""

from __future__ import annotations

import torch

from lmforge.codegen import cpu_gemv
from lmforge.ir.ops import OpFacts, register_op

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor")
KERNEL_MAX_ELEMENTS = 1 << 16


def reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _kernel_fits(x, cos, sin) -> bool:
    return (x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.dim() == cos.dim() == sin.dim() == 4
            and x.shape[-1] % 2 == 0 and x.numel() <= KERNEL_MAX_ELEMENTS
            and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] in (1, x.shape[1]) and cos.shape[2:] == x.shape[2:]
            and x.stride(-1) == 1 and cos.stride(-1) == 1)


def _rotary_cpu(x, cos, sin):
    kernel = cpu_gemv.kernel()
    if kernel is not None and _kernel_fits(x, cos, sin):
        return kernel.rotary(x, cos, sin)
    return reference(x, cos, sin)


_lib.impl("rotary", _rotary_cpu, "CPU")
_lib.impl("rotary", reference, "CUDA")


@torch.library.register_fake("lmforge::rotary")
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x * cos)


rotary = torch.ops.lmforge.rotary.default

register_op(rotary, OpFacts(shard="elementwise", cpu=_rotary_cpu))  # per head and position: keeps any head cut
