"""Which implementation an op runs (`codegen/dispatch.py`): the `LMFORGE_KERNELS` modes, bad values, and the
check that Triton on the CPU has its interpreter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmforge.codegen.dispatch import KERNEL_MODES, check_kernel_env, kernel_mode, use_triton
from lmforge.errors import LmforgeError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CPU_TENSOR = torch.zeros(2)
CUDA_TENSOR = SimpleNamespace(device=CUDA)  # use_triton reads only the device; no GPU needed to ask


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_modes():
    assert KERNEL_MODES == ("auto", "torch", "triton")


@pytest.mark.parametrize("value, mode", [
    (None, "auto"),  # unset
    ("", "auto"),
    ("auto", "auto"),
    ("torch", "torch"),
    ("triton", "triton"),
    (" Triton ", "triton"),  # case and spaces are forgiven
    ("TORCH", "torch"),
])
def test_kernel_mode_reads_the_environment(clean_env, value, mode):
    if value is not None:
        clean_env.setenv("LMFORGE_KERNELS", value)
    assert kernel_mode() == mode


@pytest.mark.parametrize("value", ["fast", "cuda", "torch,triton"])
def test_bad_values_name_the_choices(clean_env, value):
    clean_env.setenv("LMFORGE_KERNELS", value)
    message = f"LMFORGE_KERNELS={value.lower()!r}: expected one of auto, torch, triton"
    with pytest.raises(ValueError) as err:
        kernel_mode()
    assert str(err.value) == message
    with pytest.raises(LmforgeError) as err:  # the user-facing check says the same, as one line
        check_kernel_env(CPU)
    assert str(err.value) == message
    with pytest.raises(ValueError):  # and an op asked to run does not silently pick one
        use_triton(CPU_TENSOR)


@pytest.mark.parametrize("mode, interpret, device, runs_triton", [
    (None, None, CPU, False),  # auto: torch on the CPU ...
    (None, None, CUDA, True),  # ... Triton on CUDA
    ("auto", "1", CPU, False),  # the interpreter alone does not send CPU ops to Triton
    ("auto", None, CUDA, True),
    ("torch", None, CPU, False),
    ("torch", "1", CUDA, False),  # torch means torch, even on a GPU
    ("triton", "1", CPU, True),  # how the tests run the kernels on the CPU
    ("triton", None, CUDA, True),  # a GPU needs no interpreter
    ("triton", "0", CUDA, True),
])
def test_use_triton(clean_env, mode, interpret, device, runs_triton):
    if mode is not None:
        clean_env.setenv("LMFORGE_KERNELS", mode)
    if interpret is not None:
        clean_env.setenv("TRITON_INTERPRET", interpret)
    assert use_triton(CPU_TENSOR if device == CPU else CUDA_TENSOR) is runs_triton
    check_kernel_env(device)  # every one of these settings can run


@pytest.mark.parametrize("interpret", [None, "0", "true"])
def test_triton_on_the_cpu_needs_the_interpreter(clean_env, interpret):
    clean_env.setenv("LMFORGE_KERNELS", "triton")
    if interpret is not None:
        clean_env.setenv("TRITON_INTERPRET", interpret)
    message = "LMFORGE_KERNELS=triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1"
    with pytest.raises(LmforgeError) as err:
        check_kernel_env(CPU)
    assert str(err.value) == message
    with pytest.raises(RuntimeError, match="needs Triton's interpreter"):  # an op never falls back silently
        use_triton(CPU_TENSOR)
    check_kernel_env(CUDA)  # the same setting is fine for a GPU
