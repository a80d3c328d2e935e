"""The CPU GEMV kernel (cpu/gemv.c) against a float64 reference, in every ISA path this machine can run."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from tests.conftest import int4_float64

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


@pytest.mark.parametrize("M,N,K", [(1, 37, 577), (3, 64, 33), (8, 5, 7), (2, 130, 1536), (1, 1, 1), (2, 19, 59)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_float64(kernel, M, N, K, bias, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    x = (torch.randn(M, K + 3, generator=gen) + 0.1).to(dtype)[:, :K]  # rows with a stride, as views come
    w = (torch.randn(N, K, generator=gen) + 0.1).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    assert cpu_gemv.supports(x, w, b)
    y = kernel(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (M, N)
    # float32 accumulation, then (bfloat16) one rounding to bfloat16 (relative 2^-8)
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -23
    tol = rounding * want.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - want).abs() <= tol).all(), (y.double() - want).abs().max()


def test_batched_leading_dims_and_refusals(kernel):
    x = torch.randn(2, 3, 40).bfloat16()
    w = torch.randn(24, 40).bfloat16()
    torch.testing.assert_close(kernel(x, w).float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    assert not cpu_gemv.supports(torch.randn(9, 40).bfloat16(), w)  # more rows than the kernel takes
    assert cpu_gemv.supports(x.float(), w.float())  # gemv_f32
    assert not cpu_gemv.supports(x.float(), w) and not cpu_gemv.supports(x.half(), w.half())
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


def int4_reference(x, qweight, scales, zeros, group_size, bias):
    """float64 `x @ w.T + bias` with w unpacked from the nibbles: column 2j low, 2j + 1 high."""
    N = qweight.shape[0]
    want = int4_float64(x, qweight, scales, zeros, group_size, bias)
    q = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(N, -1).double()  # (N, K)
    z = torch.full_like(scales, 8.0) if zeros is None else zeros
    s_k = scales.double().repeat_interleave(group_size, dim=1)  # (N, K)
    z_k = z.double().repeat_interleave(group_size, dim=1)  # (N, K)
    # every intermediate the kernel sums (q * x and zero * x, per group) is bounded by this
    bound = x.double().abs() @ ((q + z_k) * s_k).T
    return want, bound


def int4_inputs(M, N, K, group_size, dtype, zeros, bias, lead=(), seed=0, scale_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, M, K + 5, generator=gen) + 0.1).to(dtype)[..., :K]  # rows with a stride
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(N, K // group_size, generator=gen) * 0.05 + 0.01).to(scale_dtype)
    zeros = (torch.rand(N, K // group_size, generator=gen) * 15).to(scale_dtype) if zeros else None
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, qweight, scales, zeros, b


def assert_int4_close(y, x, qweight, scales, zeros, group_size, b):
    want, bound = int4_reference(x, qweight, scales, zeros, group_size, b)
    assert y.dtype == x.dtype and y.shape == want.shape
    # float32 accumulation (well inside 1e-5 of the summed magnitudes), then for bfloat16 one rounding to
    # nearest (relative 2^-9, checked as 2^-8); float32 output has no rounding beyond the accumulation
    rel = 2 ** -8 if x.dtype == torch.bfloat16 else 1e-6
    tol = rel * want.abs() + 1e-5 * bound
    assert ((y.double() - want).abs() <= tol).all(), ((y.double() - want).abs() / bound).max()


@pytest.mark.parametrize("M", [1, 3, 8, 9, 33])
# K % 128 (the dot path's tail) is 64, 0, 32 and 96 among these
@pytest.mark.parametrize("N,K,group_size", [(37, 576, 64), (5, 64, 32), (37, 96, 32), (5, 576, 32),
                                            (37, 256, 128), (8, 576, 64), (5, 160, 32), (37, 224, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_float64(kernel, M, N, K, group_size, dtype, scale_dtype):
    for zeros, bias in ((True, False), (False, True)):
        args = int4_inputs(M, N, K, group_size, dtype, zeros, bias, seed=M * 1000 + N + K, scale_dtype=scale_dtype)
        x, qweight, scales, zp, b = args
        assert cpu_gemv.supports_int4(x, qweight, scales, zp, group_size, b)
        assert_int4_close(kernel.int4(x, qweight, scales, zp, group_size, b), x, qweight, scales, zp, group_size, b)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_group_sizes_leading_dims_and_prefill(kernel, group_size):
    # (2, 3) leading dims; then a prefill-sized M whose last chunk of rows is partial
    for lead, M, N in (((2, 3), 1, 37), ((2,), 4, 5), ((), 70, 19)):
        x, qweight, scales, zp, b = int4_inputs(M, N, 512, group_size, torch.bfloat16, True, True, lead, seed=M)
        for x in (x, x.contiguous()):  # rows with a stride, then without
            y = kernel.int4(x, qweight, scales, zp, group_size, b)
            assert y.shape == (*lead, M, N)
            assert_int4_close(y, x, qweight, scales, zp, group_size, b)
    x1 = x[0]  # one row, no leading dim: (K,) -> (N,)
    y = kernel.int4(x1, qweight, scales, zp, group_size, b)
    assert y.shape == (N,)
    assert_int4_close(y, x1, qweight, scales, zp, group_size, b)


def test_int4_empty_x(kernel):
    x, qweight, scales, zp, _ = int4_inputs(0, 5, 64, 32, torch.float32, True, False)
    assert kernel.int4(x, qweight, scales, zp, 32).shape == (0, 5)


def test_int4_refusals(kernel):
    x, qweight, scales, zp, b = int4_inputs(2, 6, 128, 64, torch.bfloat16, True, True)
    assert cpu_gemv.supports_int4(x, qweight, scales, zp, 64, b)
    assert cpu_gemv.supports_int4(x.float(), qweight, scales, None, 64, b.float())
    assert not cpu_gemv.supports_int4(x.half(), qweight, scales, zp, 64)  # x neither bfloat16 nor float32
    assert not cpu_gemv.supports_int4(x, qweight.to(torch.int8), scales, zp, 64)  # codes must be uint8
    assert cpu_gemv.supports_int4(x, qweight, scales.bfloat16(), zp.bfloat16(), 64, b)  # or both bfloat16
    assert not cpu_gemv.supports_int4(x, qweight, scales.bfloat16(), zp, 64)  # scales and zeros in one dtype
    assert not cpu_gemv.supports_int4(x, qweight, scales.half(), None, 64)  # float16: widened at load
    assert not cpu_gemv.supports_int4(x, qweight, None, zp, 64)  # scales are required (zeros are optional)
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp.double(), 64)
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp, 64, b.float())  # bias in x's dtype
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp, 64, b[:5])
    wide = torch.randint(0, 256, (6, 128), dtype=torch.uint8)
    assert not cpu_gemv.supports_int4(x, wide[:, :64], scales, zp, 64)  # qweight not contiguous
    assert not cpu_gemv.supports_int4(x, qweight.t().contiguous().t(), scales, zp, 64)
    assert not cpu_gemv.supports_int4(x[:, :96], qweight, scales, zp, 64)  # K != 2 * qweight.shape[1]
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp, 48)  # not a supported group size
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp, 256)  # does not divide K (and scales' shape)
    assert not cpu_gemv.supports_int4(x, qweight, scales[:, :1], zp, 64)  # scales (N, K // group_size)
    assert not cpu_gemv.supports_int4(x, qweight, scales.t().contiguous().t(), zp, 64)
    assert not cpu_gemv.supports_int4(x, qweight, scales, zp[:5], 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        kernel.int4(x, qweight, scales, zp, 48)
