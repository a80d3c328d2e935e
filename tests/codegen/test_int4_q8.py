"""The int4 x int8-activation decode GEMV (cpu/int4_q8.c, `LMFORGE_INT4_ACT=int8`) against float64 references.

Given the activations as the kernel quantizes them (int8 per 32 columns, scale amax / 127, to nearest), the
kernel's sum is exact up to float32 accumulation; against the unquantized activations it is off by at most
what that quantization allows (half a step of each block's scale, times the weights' magnitudes)."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from lmforge.errors import ArtifactError
from tests.codegen.test_cpu_gemv import int4_inputs, int4_reference

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")


@pytest.fixture(scope="module")
def kernel():
    k = cpu_gemv.Kernel(cpu_gemv.build())
    if not k.lib.int4_q8_available():
        pytest.skip("this CPU has no AVX512-VNNI")
    k.int8_activations = True
    return k


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per row, blocks of 32 columns quantized to int8 and back (float32 math)."""
    x32 = x.float().reshape(-1, x.shape[-1])
    M, K = x32.shape
    blocks = x32.reshape(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # float32 divisions rounded correctly, as C's (torch's own tensor division may be off by an ulp)
    inv = torch.where(amax > 0, (127.0 / amax.double()).float(), torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)  # to nearest even, as the kernel's vcvtps2dq
    return (q.double() * (amax.double() / 127.0).float().double()).reshape(x.shape)


def unpacked(qweight, scales, zeros, group_size) -> torch.Tensor:
    N = qweight.shape[0]
    q = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(N, -1).double()
    z = torch.full_like(scales, 8.0) if zeros is None else zeros
    return (q - z.double().repeat_interleave(group_size, 1)) * scales.double().repeat_interleave(group_size, 1)


@pytest.mark.parametrize("M", [1, 2, 5, 8])
# K % 64 == 32 (a half chunk at the end) in 96, 160, 224
@pytest.mark.parametrize("N,K,group_size", [(37, 576, 64), (5, 64, 32), (37, 96, 32), (9, 160, 32),
                                            (37, 256, 128), (13, 1536, 256), (4, 224, 32), (3, 512, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_exact_given_the_quantized_activations(kernel, M, N, K, group_size, dtype, scale_dtype):
    for zeros, bias in ((True, False), (False, True)):
        x, qweight, scales, zp, b = int4_inputs(M, N, K, group_size, dtype, zeros, bias, seed=M * 100 + N + K,
                                                scale_dtype=scale_dtype)
        y = kernel.int4(x, qweight, scales, zp, group_size, b)
        w = unpacked(qweight, scales, zp, group_size)
        want = quantized_x(x) @ w.T + (0 if b is None else b.double())
        bound = quantized_x(x).abs() @ w.abs().T + 1e-3
        rel = 2 ** -8 if dtype == torch.bfloat16 else 0.0  # bfloat16 output: one rounding to nearest
        assert y.dtype == dtype and y.shape == want.shape
        assert ((y.double() - want).abs() <= rel * want.abs() + 1e-5 * bound).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_close_to_the_unquantized_product(kernel, group_size):
    x, qweight, scales, zp, b = int4_inputs(3, 40, 1024, group_size, torch.float32, True, True, seed=group_size)
    y = kernel.int4(x, qweight, scales, zp, group_size, b).double()
    want, _ = int4_reference(x, qweight, scales, zp, group_size, b)
    w = unpacked(qweight, scales, zp, group_size)
    step = x.double().reshape(3, -1, 32).abs().amax(-1, keepdim=True) / 127  # per block
    worst = (step / 2).expand(3, 32, 32).reshape(3, 1024) @ w.abs().T  # half a step on every column
    err = (y - want).abs()
    assert (err <= worst + 1e-5).all()
    assert err.max() > 0  # the activations were quantized: the kernel is not the float path


def test_larger_batches_and_refusals_fall_back(kernel):
    # past Q8_MAX_ROWS the float path computes the product (exact up to float32 accumulation)
    x, qweight, scales, zp, b = int4_inputs(cpu_gemv.Q8_MAX_ROWS + 1, 7, 128, 64, torch.float32, True, True)
    want, bound = int4_reference(x, qweight, scales, zp, 64, b)
    assert ((kernel.int4(x, qweight, scales, zp, 64, b).double() - want).abs() <= 1e-6 * want.abs() + 1e-5 * bound).all()
    assert kernel._int4_q8(x.data_ptr(), 128, 1, qweight.data_ptr(), scales.data_ptr(), zp.data_ptr(), 0, None,
                           x.data_ptr(), 7, cpu_gemv.Q8_MAX_ROWS + 1, 7, 128, 64, 1) == -1
    assert kernel._int4_q8(x.data_ptr(), 128, 1, qweight.data_ptr(), scales.data_ptr(), zp.data_ptr(), 0, None,
                           x.data_ptr(), 7, 1, 7, 128, 48, 1) == -1  # not a supported group size


def test_the_setting_chooses_the_path(monkeypatch):
    monkeypatch.delenv("LMFORGE_INT4_ACT", raising=False)
    assert cpu_gemv.int4_activations() == "float"
    assert not cpu_gemv.Kernel(cpu_gemv.build()).int8_activations
    monkeypatch.setenv("LMFORGE_INT4_ACT", "int8")
    k = cpu_gemv.Kernel(cpu_gemv.build())
    assert k.int8_activations == bool(k.lib.int4_q8_available())
    monkeypatch.setenv("LMFORGE_INT4_ACT", "int16")
    with pytest.raises(ArtifactError, match="LMFORGE_INT4_ACT='int16': use one of int8, float"):
        cpu_gemv.int4_activations()
