"""Which implementation an lmforge op runs: `LMFORGE_KERNELS=auto|torch|triton`.

- `torch`: the op's PyTorch reference (and, on the CPU, lmforge's C kernels where the op has one);
- `triton`: the Triton kernels in `codegen/kernels/`; on the CPU only under Triton's interpreter
  (`TRITON_INTERPRET=1`), which is how the tests run them;
- `auto` (the default): Triton on CUDA tensors, torch elsewhere.
"""

from __future__ import annotations

import os

import torch

KERNEL_MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("LMFORGE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"LMFORGE_KERNELS={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


def check_kernel_env(device: torch.device) -> None:
    """Fail early, in one line, on a kernel setting that cannot run on `device`."""
    from lmforge.errors import LmforgeError

    try:
        mode = kernel_mode()
    except ValueError as e:
        raise LmforgeError(str(e)) from None
    problem = _triton_unavailable(mode, device)
    if problem:
        raise LmforgeError(problem)


def _triton_unavailable(mode: str, device: torch.device) -> str | None:
    """Why the Triton kernels asked for by `mode` cannot run on `device`, or None."""
    if mode == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "LMFORGE_KERNELS=triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1"
    return None


def use_triton(t: torch.Tensor) -> bool:
    """Should an op on tensor `t` run its Triton kernel?"""
    if t.device.type == "cpu" and "LMFORGE_KERNELS" not in os.environ:  # the common case, decided cheaply
        return False
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        problem = _triton_unavailable(mode, t.device)
        if problem:
            raise RuntimeError(problem)
        return True
    return t.device.type == "cuda"
