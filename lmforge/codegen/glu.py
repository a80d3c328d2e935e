"""`lmforge::glu`: a gated MLP's activation and product as one op.

    glu(gate, up, act) -> act(gate) * up        gate, up (..., F) of one floating dtype; the result likewise

    act  "silu"       SwiGLU (Llama, Qwen2, Mistral, Phi-3)            aten.silu(gate)
         "gelu"       GeGLU with the exact GELU                        aten.gelu(gate)
         "gelu_tanh"  GeGLU with GELU's tanh form (Gemma's gelu_pytorch_tanh)   aten.gelu(gate, approximate="tanh")

Its reference is those two ATen ops, so a rewrite to it changes nothing numerically: act(gate) is computed
in gate's dtype (PyTorch works in float32 inside and rounds to a half dtype once), then multiplied by up and
rounded again, as Hugging Face's `act_fn(gate_proj(x)) * up_proj(x)` is. Every implementation keeps those two
roundings.

Implementations, chosen per call:
- Triton (`codegen/kernels/glu.py`) on CUDA, and on the CPU with `LMFORGE_KERNELS=triton` under Triton's
  interpreter (`codegen/dispatch.py`);
- on the CPU, decode-sized bfloat16 and float32 rows of silu and gelu_tanh through `cpu/gemv.c`'s `glu_silu_bf16`,
  `glu_gelu_tanh_bf16` and their `_f32` twins (one pass over the rows instead of two ops and an intermediate tensor);
- everything else (other shapes, dtypes or activations) runs the reference.
"""

from __future__ import annotations

import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.dispatch import use_triton
from lmforge.ir.ops import Casts, OpFacts, register_op
from lmforge.ir.spec import spec_of
from lmforge.ir.verify import same_float_dtype

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("glu(Tensor gate, Tensor up, str act) -> Tensor")

aten = torch.ops.aten
# act -> the ATen activation it stands for, on gate
ACTS = {
    "silu": lambda gate: aten.silu.default(gate),
    "gelu": lambda gate: aten.gelu.default(gate),
    "gelu_tanh": lambda gate: aten.gelu.default(gate, approximate="tanh"),
}
KERNEL_MAX_ROWS = 64  # the CPU kernel is for decode steps: a few rows (prefill runs PyTorch's threaded ops)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"glu: act must be one of {', '.join(ACTS)}, got {act!r}")


def reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, with exactly the ATen ops (and PyTorch's roundings) the op stands for."""
    _check_act(act)
    return ACTS[act](gate) * up


def _same(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """One shape and dtype, nothing empty: the case every kernel takes (the reference takes the rest)."""
    return gate.shape == up.shape and gate.dtype == up.dtype and gate.numel() > 0


def _cpu_kernel_takes(gate, up, act: str) -> bool:
    """Does `cpu/gemv.c`'s GLU compute this call? Decode-sized CPU rows of one shape in bfloat16 or float32."""
    return (gate.device.type == "cpu" and gate.dtype in cpu_gemv.GLU_DTYPES and act in cpu_gemv.GLU_ACTS
            and _same(gate, up) and gate.numel() <= KERNEL_MAX_ROWS * gate.shape[-1])


def glu_impl(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    _check_act(act)
    if use_triton(gate) and _same(gate, up) and gate.dtype in _KERNEL_DTYPES:
        from lmforge.codegen.kernels import glu as kernels

        return kernels.glu(gate, up, act)
    if _cpu_kernel_takes(gate, up, act):
        kernel = cpu_gemv.kernel()
        if kernel is not None:
            return kernel.glu(gate, up, act)
    return reference(gate, up, act)


def _record_glu(b, gate, up, act: str):
    """The CPU kernel call `glu_impl` makes, for a step program (`cpu_program.py`)."""
    g, u = b.rows(gate), b.rows(up)
    if g is None or u is None or not _cpu_kernel_takes(gate, up, act):
        return None
    K = gate.shape[-1]
    y = b.out(gate.shape, gate.dtype)
    b.call(f"glu_{act}_{'bf16' if gate.dtype == torch.bfloat16 else 'f32'}", (gate, up, y), (g[1], u[1], K, g[0], K))
    return y


_lib.impl("glu", glu_impl, "CPU")
_lib.impl("glu", glu_impl, "CUDA")


@torch.library.register_fake("lmforge::glu")
def _glu_fake(gate, up, act):
    _check_act(act)
    return torch.empty_like(gate * up)


glu = torch.ops.lmforge.glu.default


def _verify(node) -> str | None:
    """act is known; gate and up have one dtype (a mixed pair would promote) and one shape."""
    act = node.args[2] if len(node.args) > 2 else node.kwargs.get("act")
    if act not in ACTS:
        return f"act {act!r} is not one of {', '.join(ACTS)}"
    problem = same_float_dtype(0, 1)(node)
    if problem:
        return problem
    gate, up = spec_of(node.args[0]), spec_of(node.args[1])
    if gate is not None and up is not None and gate.shape != up.shape:
        return f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape"
    return None


register_op(glu, OpFacts(
    shard="elementwise",  # gate and up come from column-parallel layers: each rank gates its own slice
    verify=("glu", _verify),
    # up runs in gate's dtype, the activation's: one dtype, as the verify rule asks (both come from linear
    # layers in the weights' dtype, so in practice this never adds a cast)
    casts=Casts((1,), to=0, why="cast-glu-input"),
    cpu=glu_impl,
    record=_record_glu,
))
