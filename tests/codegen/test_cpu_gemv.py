"""The CPU GEMV kernel (cpu/gemv.c) against a float64 reference, in every ISA path this machine can run."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")

# the native build, then the same source with the faster instruction sets switched off, one by one
VARIANTS = {"native": (), "no-avx512bf16": ("-mno-avx512bf16",), "no-avx512": ("-mno-avx512f",),
            "no-avx": ("-mno-avx",)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def kernel(request):
    return cpu_gemv.Kernel(cpu_gemv.build(VARIANTS[request.param]))


def test_variants_report_their_isa():
    isas = {name: cpu_gemv.Kernel(cpu_gemv.build(flags)).isa for name, flags in VARIANTS.items()}
    assert isas["no-avx"] == "scalar" and isas["no-avx512"] in ("avx2", "scalar")
    assert isas["no-avx512bf16"] in ("avx512f", "avx2", "scalar")


@pytest.mark.parametrize("M,N,K", [(1, 37, 577), (3, 64, 33), (8, 5, 7), (2, 130, 1536), (1, 1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(kernel, M, N, K, bias):
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    x = (torch.randn(M, K + 3, generator=gen) + 0.1).bfloat16()[:, :K]  # rows with a stride, as views come
    w = (torch.randn(N, K, generator=gen) + 0.1).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16() if bias else None
    y = kernel(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # float32 accumulation, then one rounding to bfloat16 (relative 2^-8)
    tol = 2 ** -8 * want.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - want).abs() <= tol).all(), (y.double() - want).abs().max()


def test_batched_leading_dims_and_refusals(kernel):
    x = torch.randn(2, 3, 40).bfloat16()
    w = torch.randn(24, 40).bfloat16()
    torch.testing.assert_close(kernel(x, w).float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    assert not cpu_gemv.supports(torch.randn(9, 40).bfloat16(), w)  # more rows than the kernel takes
    assert not cpu_gemv.supports(x.float(), w.float())
    assert not cpu_gemv.supports(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="9 rows of x, the kernel takes 1..8"):
        kernel(torch.randn(9, 40).bfloat16(), w)


def test_linear_op_falls_back_beyond_the_kernel():
    from lmforge.codegen.linear import linear

    w = torch.randn(24, 40).bfloat16()
    for x in (torch.randn(1, 40).bfloat16(), torch.randn(20, 40).bfloat16(), torch.randn(3, 40)):
        want = torch.nn.functional.linear(x.float(), w.float())
        got = linear(x, w.to(x.dtype))
        assert got.dtype == x.dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("M,K", [(1, 576), (3, 33), (2, 7), (5, 1536)])
def test_rms_norm_kernel_matches_float64(kernel, M, K):
    gen = torch.Generator().manual_seed(M + K)
    x = (torch.randn(M, K + 2, generator=gen) * 3 + 0.1).bfloat16()[:, :K]
    w = (torch.randn(K, generator=gen) + 1).bfloat16()
    y = kernel.rms_norm(x, w, 1e-5)
    x64 = x.double()
    want = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert y.dtype == torch.bfloat16 and y.shape == (M, K)
    assert ((y.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()


def test_rms_norm_op_equals_its_reference():
    from lmforge.codegen.rms_norm import reference, rms_norm

    x, w = torch.randn(2, 3, 40).bfloat16(), torch.randn(40).bfloat16()
    for out_dtype, cast_first in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        got = rms_norm(x, w, 1e-6, out_dtype, cast_first)
        want = reference(x, w, 1e-6, out_dtype, cast_first)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-6)
