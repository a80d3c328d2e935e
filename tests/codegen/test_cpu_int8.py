"""The CPU int8 weight-only kernel (cpu/int8.c) against a float64 reference, in every ISA path this machine can
run: random codes over the whole int8 range the scheme uses, odd sizes, strided rows, decode and prefill row
counts (chunks of 8 rows of x, tiles of 16 weight rows, a partial block of 4 weight rows)."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from tests.codegen.test_cpu_gemv import VARIANTS

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")


@pytest.fixture(scope="module", params=list(VARIANTS))
def kernel(request):
    return cpu_gemv.Kernel(cpu_gemv.build(VARIANTS[request.param]))


def int8_inputs(M, N, K, dtype, bias, lead=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, M, K + 5, generator=gen) + 0.1).to(dtype)[..., :K]  # rows with a stride
    qweight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    scales = torch.rand(N, generator=gen) * 0.02 + 0.001
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, qweight, scales, b


def assert_int8_close(y, x, qweight, scales, b):
    w = qweight.double() * scales.double()[:, None]
    want = x.double() @ w.T + (0 if b is None else b.double())
    bound = x.double().abs() @ w.abs().T  # every partial sum the kernel makes is bounded by this
    assert y.dtype == x.dtype and y.shape == want.shape
    # float32 accumulation (well inside 1e-5 of the summed magnitudes), then for bfloat16 one rounding to
    # nearest (relative 2^-9, checked as 2^-8)
    rel = 2 ** -8 if x.dtype == torch.bfloat16 else 1e-6
    tol = rel * want.abs() + 1e-5 * bound
    assert ((y.double() - want).abs() <= tol).all(), ((y.double() - want).abs() / bound).max()


@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 20])
# K % 32 (the masked tail) is 0, 1, 31, 16 and 3 among these; N crosses blocks of 4 rows and tiles of 16
@pytest.mark.parametrize("N,K", [(37, 576), (5, 1), (6, 63), (64, 48), (17, 1539), (1, 35)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_matches_float64(kernel, M, N, K, dtype):
    for bias in (False, True):
        x, qweight, scales, b = int8_inputs(M, N, K, dtype, bias, seed=M * 1000 + N + K)
        assert cpu_gemv.supports_int8(x, qweight, scales, b)
        assert_int8_close(kernel.int8(x, qweight, scales, b), x, qweight, scales, b)


def test_int8_leading_dims_contiguous_rows_and_one_row(kernel):
    for lead, M, N in (((2, 3), 1, 37), ((2,), 4, 5), ((), 70, 19)):
        x, qweight, scales, b = int8_inputs(M, N, 320, torch.bfloat16, True, lead, seed=M)
        for x in (x, x.contiguous()):  # rows with a stride, then without
            y = kernel.int8(x, qweight, scales, b)
            assert y.shape == (*lead, M, N)
            assert_int8_close(y, x, qweight, scales, b)
    x1 = x[0]  # one row, no leading dim: (K,) -> (N,)
    y = kernel.int8(x1, qweight, scales, b)
    assert y.shape == (N,)
    assert_int8_close(y, x1, qweight, scales, b)


def test_int8_empty_x_and_extreme_codes(kernel):
    x, qweight, scales, _ = int8_inputs(0, 5, 64, torch.float32, False)
    assert kernel.int8(x, qweight, scales).shape == (0, 5)
    # every code -127 or 127 against x of one sign: the largest sums the scheme can make, exactly
    x = torch.full((3, 200), 0.5)
    qweight = torch.tensor([127, -127], dtype=torch.int8).repeat(4, 100)
    y = kernel.int8(x, qweight, torch.ones(4))
    assert torch.equal(y, torch.zeros(3, 4))
    assert torch.equal(kernel.int8(x, qweight.abs(), torch.full((4,), 2.0)), torch.full((3, 4), 127.0 * 200))


def test_int8_refusals(kernel):
    x, qweight, scales, b = int8_inputs(2, 6, 128, torch.bfloat16, True)
    assert cpu_gemv.supports_int8(x, qweight, scales, b)
    assert cpu_gemv.supports_int8(x.float(), qweight, scales, b.float())
    assert cpu_gemv.supports_int8(x, qweight, scales)
    assert not cpu_gemv.supports_int8(x.half(), qweight, scales)  # x neither bfloat16 nor float32
    assert not cpu_gemv.supports_int8(x, qweight.view(torch.uint8), scales)  # codes must be int8
    assert not cpu_gemv.supports_int8(x, qweight, scales.bfloat16())  # scales float32
    assert not cpu_gemv.supports_int8(x, qweight, scales[:5])  # scales (N,)
    assert not cpu_gemv.supports_int8(x, qweight, scales[:, None])
    assert not cpu_gemv.supports_int8(x, qweight, scales, b.float())  # bias in x's dtype
    assert not cpu_gemv.supports_int8(x, qweight, scales, b[:5])
    assert not cpu_gemv.supports_int8(x, qweight.t().contiguous().t(), scales)  # qweight not contiguous
    assert not cpu_gemv.supports_int8(x[:, :96], qweight, scales)  # K != qweight.shape[1]
    assert not cpu_gemv.supports_int8(x, qweight[:, :0], scales)  # K = 0
    assert not cpu_gemv.supports_int8(x, qweight.to("meta"), scales)  # not on the CPU
