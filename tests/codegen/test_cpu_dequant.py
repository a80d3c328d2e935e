"""The prefill route of the CPU int4 and int8 ops (`codegen/cpu_dequant.py`, `cpu/dequant.c`): the dequantized rows
bit for bit against PyTorch's own dequantization in every ISA path this machine can run (odd row counts, every
group size, zero points or none, float32 or bfloat16 scales, a masked tail of int8 columns), the chunked matmul
against one matmul with the whole dequantized weight and against a float64 reference, and which calls take it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_dequant, cpu_gemv, quant_linear
from lmforge.errors import ArtifactError
from tests.codegen.test_cpu_gemv import VARIANTS

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")


@pytest.fixture(scope="module", params=[v for v in VARIANTS if v != "no-avx"])
def kernel(request):
    return cpu_gemv.Kernel(cpu_gemv.build(VARIANTS[request.param]))


def int4_weight(N, K, G, scale_dtype, zeros, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(N, K // G, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    z = (torch.rand(N, K // G, generator=gen) * 15).to(scale_dtype) if zeros else None
    return qweight, scales, z


def int4_dequantized(qweight, scales, zeros, G, dtype):
    N = qweight.shape[0]
    q = torch.stack([qweight & 15, qweight >> 4], -1).reshape(N, -1).float()
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(G, 1)
    return ((q - z) * scales.float().repeat_interleave(G, 1)).to(dtype)


@pytest.mark.parametrize("G", [32, 64, 128, 256])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_int4_rows_exact(kernel, G, scale_dtype, zeros, dtype):
    N, K = 37, 2 * 256
    qweight, scales, z = int4_weight(N, K, G, scale_dtype, zeros)
    n0, n1 = 3, 34
    out = torch.full((n1 - n0, K), float("nan"), dtype=dtype)
    kernel.dequant_int4(qweight, scales, z, G, n0, n1, out)
    assert torch.equal(out, int4_dequantized(qweight, scales, z, G, dtype)[n0:n1])


@pytest.mark.parametrize("K", [1, 15, 16, 17, 333, 576])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_int8_rows_exact(kernel, K, dtype):
    gen = torch.Generator().manual_seed(K)
    N = 23
    qweight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    scales = torch.rand(N, generator=gen) * 0.02 + 0.001
    flat = torch.full(((N - 2) * K + 7,), float("nan"), dtype=dtype)
    got = flat[:(N - 2) * K].view(N - 2, K)
    kernel.dequant_int8(qweight, scales, 2, N, got)
    assert torch.equal(got, (qweight.float() * scales[:, None]).to(dtype)[2:])
    assert flat[(N - 2) * K:].isnan().all()  # nothing written past the rows asked for


def test_dequant_bad_sizes(kernel):
    qweight, scales, _ = int4_weight(4, 64, 32, torch.float32, False)
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dequant_int4"):
        kernel.dequant_int4(qweight, scales, None, 48, 0, 4, out)
    with pytest.raises(ValueError, match="dequant_int8"):
        kernel.dequant_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), 3, 1, out)


def by_chunks(x, w, b, rows):
    """F.linear chunk by chunk of `rows` weight rows, as the route multiplies (oneDNN's sums depend on the shape,
    so one matmul with the whole weight can differ in the last bit)."""
    x2 = x.reshape(-1, x.shape[-1])
    parts = [F.linear(x2, w[n:n + rows], None if b is None else b[n:n + rows]) for n in range(0, w.shape[0], rows)]
    return torch.cat(parts, -1).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 100, 7])
def test_chunked_matmul_is_the_dequantized_matmul(monkeypatch, dtype, bias, chunk_rows):
    k = cpu_gemv.kernel()
    N, K, G = 301, 576, 64
    if chunk_rows:
        monkeypatch.setattr(cpu_dequant, "CHUNK_BYTES", chunk_rows * K * torch.finfo(dtype).bits // 8)
    rows = chunk_rows or N
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 19, K + 3, generator=gen) + 0.1).to(dtype)[..., :K]  # rows with a stride
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    qweight, scales, z = int4_weight(N, K, G, torch.float32, True, seed=2)
    w = int4_dequantized(qweight, scales, z, G, dtype)
    y = cpu_dequant.int4_matmul(k, x, qweight, scales, z, G, b)
    assert y.shape == (2, 19, N) and y.dtype == dtype
    assert torch.equal(y, by_chunks(x, w, b, rows))
    # (F.linear on strided 3-d x rounds before adding the bias; the route, like contiguous x, adds it in float32)
    torch.testing.assert_close(y, F.linear(x.contiguous(), w, b))
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s8 = torch.rand(N, generator=gen) * 0.02
    y8 = cpu_dequant.int8_matmul(k, x, q8, s8, b)
    assert torch.equal(y8, by_chunks(x, (q8.float() * s8[:, None]).to(dtype), b, rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ops_take_the_route_and_stay_close_to_float64(monkeypatch, dtype):
    """int4_linear / int8_linear with 32 rows, forced onto the route, against float64 with the exact weights: the
    weight rounded to x's dtype (relative 2^-9 for bfloat16) plus float32 sums and the output's rounding."""
    monkeypatch.setenv("LMFORGE_QUANT_PREFILL", "dequant")
    calls = []
    real = cpu_dequant._chunked
    monkeypatch.setattr(cpu_dequant, "_chunked", lambda *a: calls.append(1) or real(*a))
    N, K, G = 96, 384, 128
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(32, K, generator=gen) + 0.1).to(dtype)
    qweight, scales, z = int4_weight(N, K, G, torch.float32, True, seed=4)
    y = quant_linear.int4_linear_impl(x, qweight, scales, z, G)
    w = int4_dequantized(qweight, scales, z, G, torch.float64)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s8 = torch.rand(N, generator=gen) * 0.02
    y8 = quant_linear.int8_linear_impl(x, q8, s8)
    assert len(calls) == 2
    rel = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    for got, weight in ((y, w), (y8, q8.double() * s8.double()[:, None])):
        want = x.double() @ weight.T
        bound = x.double().abs() @ weight.abs().T
        assert ((got.double() - want).abs() <= rel * want.abs() + rel * bound).all()


def test_few_rows_and_kernel_route_take_the_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_dequant, "_chunked", lambda *a: calls.append(1))
    qweight, scales, z = int4_weight(16, 128, 32, torch.float32, False)
    x = torch.randn(cpu_dequant.MIN_ROWS - 1, 128).bfloat16()
    monkeypatch.setenv("LMFORGE_QUANT_PREFILL", "dequant")
    quant_linear.int4_linear_impl(x, qweight, scales, z, 32)
    monkeypatch.setenv("LMFORGE_QUANT_PREFILL", "kernel")
    quant_linear.int4_linear_impl(torch.randn(64, 128).bfloat16(), qweight, scales, z, 32)
    assert calls == []


def test_route_is_measured_and_the_override_checked(monkeypatch):
    k = cpu_gemv.kernel()
    assert cpu_dequant.route(k, "int4", torch.bfloat16) in cpu_dequant.ROUTES
    assert cpu_dequant.route(k, "int8", torch.float32) in cpu_dequant.ROUTES
    with pytest.raises(ValueError, match="scheme"):
        cpu_dequant.route(k, "fp8", torch.bfloat16)
    monkeypatch.setenv("LMFORGE_QUANT_PREFILL", "fast")
    with pytest.raises(ArtifactError, match="LMFORGE_QUANT_PREFILL='fast'"):
        cpu_dequant.use_dequant(k, "int4", torch.randn(32, 64))
