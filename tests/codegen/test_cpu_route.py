"""The prefill ways of the CPU linear ops (`codegen/cpu_route.py`, `cpu/dequant.c`, `cpu/amx.c`): the dequantized
rows bit for bit against PyTorch's own dequantization in every ISA path this machine can run (odd row counts,
every group size, zero points or none, float32 or bfloat16 scales, a masked tail of int8 columns); the chunked
`torch` way against the matmuls it makes; the AMX tiles against a float64 reference (odd rows of x, ragged weight
rows, odd columns, strided x, bias, both nibble-order step widths); and which calls take which way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv, cpu_route, linear, quant_linear
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
@pytest.mark.parametrize("groups", [1, 3, 4])  # odd counts: a G = 32 row ends in half a step of 64 codes
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_int4_rows_exact(kernel, G, groups, scale_dtype, zeros, dtype):
    N, K = 37, G * groups
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
    """F.linear chunk by chunk of `rows` weight rows, as the `torch` way multiplies (oneDNN's sums depend on the
    shape, so one matmul with the whole weight can differ in the last bit)."""
    x2 = x.reshape(-1, x.shape[-1])
    parts = [F.linear(x2, w[n:n + rows], None if b is None else b[n:n + rows]) for n in range(0, w.shape[0], rows)]
    return torch.cat(parts, -1).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 100, 7])
def test_torch_way_is_the_dequantized_matmul(monkeypatch, dtype, bias, chunk_rows):
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "torch")
    k = cpu_gemv.kernel()
    N, K, G = 301, 576, 64
    if chunk_rows:
        monkeypatch.setattr(cpu_route, "CHUNK_BYTES", chunk_rows * K * torch.finfo(dtype).bits // 8)
    rows = chunk_rows or N
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 19, K + 3, generator=gen) + 0.1).to(dtype)[..., :K]  # rows with a stride
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    qweight, scales, z = int4_weight(N, K, G, torch.float32, True, seed=2)
    w = int4_dequantized(qweight, scales, z, G, dtype)
    y = cpu_route.int4_linear(k, x, qweight, scales, z, G, b)
    assert y.shape == (2, 19, N) and y.dtype == dtype
    assert torch.equal(y, by_chunks(x, w, b, rows))
    # (F.linear on strided 3-d x rounds before adding the bias; the way, like contiguous x, adds it in float32)
    torch.testing.assert_close(y, F.linear(x.contiguous(), w, b))
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s8 = torch.rand(N, generator=gen) * 0.02
    y8 = cpu_route.int8_linear(k, x, q8, s8, b)
    assert torch.equal(y8, by_chunks(x, (q8.float() * s8[:, None]).to(dtype), b, rows))


def assert_close_to_float64(y, x, w, b=None):
    """Products of bfloat16 values (or int8 codes) are exact and summed in float32 (well inside 1e-5 of the summed
    magnitudes), then rounded once to bfloat16 (relative 2^-9, checked as 2^-8)."""
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    bound = x.double().abs() @ w.double().abs().T
    assert y.shape == want.shape and y.dtype == x.dtype
    assert ((y.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-5 * bound).all(), \
        ((y.double() - want).abs() / bound).max()


needs_amx = pytest.mark.skipif(not (cpu_gemv.available() and cpu_gemv.kernel().amx_available),
                               reason="this CPU has no AMX (or the process may not use it)")


@needs_amx
@pytest.mark.parametrize("M", [16, 17, 33, 64])
@pytest.mark.parametrize("N,K", [(1, 32), (31, 100), (77, 577), (64, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_amx_bf16_weights(M, N, K, bias):
    gen = torch.Generator().manual_seed(M * N + K)
    x = (torch.randn(M, K + 7, generator=gen) + 0.1).bfloat16()[:, :K]  # rows with a stride
    w = torch.randn(N, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16() if bias else None
    assert_close_to_float64(cpu_gemv.kernel().amx(x, w, bias=b), x, w, b)


@needs_amx
@pytest.mark.parametrize("M", [16, 33])
@pytest.mark.parametrize("N", [5, 32, 70])
@pytest.mark.parametrize("G,groups", [(32, 1), (32, 3), (64, 2), (128, 5), (256, 1)])  # K % 64 == 32 at (32, 1|3)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [False, True])
def test_amx_int4_weights(M, N, G, groups, scale_dtype, zeros):
    K = G * groups
    gen = torch.Generator().manual_seed(M + N + K)
    x = (torch.randn(2, M, K, generator=gen) + 0.1).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16()
    qweight, scales, z = int4_weight(N, K, G, scale_dtype, zeros, seed=M)
    y = cpu_gemv.kernel().amx(x, qweight, scales, z, G, b)
    assert_close_to_float64(y, x, int4_dequantized(qweight, scales, z, G, torch.bfloat16), b)


@needs_amx
@pytest.mark.parametrize("M", [16, 40])
@pytest.mark.parametrize("N,K", [(3, 16), (33, 333), (64, 1536)])
def test_amx_int8_weights(M, N, K):
    gen = torch.Generator().manual_seed(N + K)
    x = (torch.randn(M, K, generator=gen) + 0.1).bfloat16()
    qweight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    scales = torch.rand(N, generator=gen) * 0.02 + 0.001
    y = cpu_gemv.kernel().amx(x, qweight, scales)
    # the codes multiply exactly and each row's scale goes on its sums: the exact weights, not rounded ones
    assert_close_to_float64(y, x, qweight.double() * scales.double()[:, None])


@needs_amx
def test_ops_take_amx_where_forced(monkeypatch):
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "amx")
    k = cpu_gemv.kernel()
    for scheme in cpu_route.SCHEMES:  # measured before the spy goes in (the probe calls amx too)
        cpu_route.ranking(k, scheme, torch.bfloat16, 32)
    calls = []
    real = k.amx
    monkeypatch.setattr(k, "amx", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=gen).bfloat16()
    w = torch.randn(48, 128, generator=gen).bfloat16()
    assert_close_to_float64(linear.linear(x, w), x, w)
    qweight, scales, z = int4_weight(48, 128, 64, torch.float32, False)
    quant_linear.int4_linear_impl(x, qweight, scales, z, 64)
    quant_linear.int8_linear_impl(x, torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=gen),
                                  torch.rand(48, generator=gen))
    assert calls == [torch.bfloat16, torch.uint8, torch.int8]
    calls.clear()  # past AMX_MAX_ROWS, and for float32 x, never
    linear.linear(torch.randn(cpu_route.AMX_MAX_ROWS + 1, 128).bfloat16(), w)
    quant_linear.int4_linear_impl(x.float(), qweight, scales, z, 64)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_ways_stay_close_to_float64(monkeypatch, dtype):
    """int4_linear / int8_linear with 32 rows by every way this machine has, against float64 with the exact weights:
    the weight rounded to x's dtype (relative 2^-9 for bfloat16) plus float32 sums and the output's rounding."""
    N, K, G = 96, 384, 128
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(32, K, generator=gen) + 0.1).to(dtype)
    qweight, scales, z = int4_weight(N, K, G, torch.float32, True, seed=4)
    w = int4_dequantized(qweight, scales, z, G, torch.float64)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s8 = torch.rand(N, generator=gen) * 0.02
    rel = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    ways = cpu_route.ranking(cpu_gemv.kernel(), "int4", dtype)
    assert set(ways) <= set(cpu_route.WAYS) and {"kernel", "torch"} <= set(ways)
    for way in ways:
        monkeypatch.setenv("LMFORGE_LINEAR_WAY", way)
        assert cpu_route.choose(cpu_gemv.kernel(), "int4", x) == way
        y = quant_linear.int4_linear_impl(x, qweight, scales, z, G)
        y8 = quant_linear.int8_linear_impl(x, q8, s8)
        for got, weight in ((y, w), (y8, q8.double() * s8.double()[:, None])):
            want = x.double() @ weight.T
            bound = x.double().abs() @ weight.abs().T
            assert ((got.double() - want).abs() <= rel * want.abs() + rel * bound).all(), way


def test_few_rows_weigh_the_kernels_against_amx_only(monkeypatch):
    k = cpu_gemv.kernel()
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "torch")  # not a way at the decode kernels' sizes: ignored
    x = torch.randn(cpu_gemv.MAX_ROWS, 128).bfloat16()
    for scheme in cpu_route.SCHEMES:
        assert cpu_route.choose(k, scheme, x) in (("kernel", "amx") if k.amx_available else ("kernel",))
        assert cpu_route.choose(k, scheme, x.float()) == "kernel"  # AMX takes bfloat16 x only
    calls = []
    monkeypatch.setattr(cpu_route, "_chunked", lambda *a: calls.append(1))
    qweight, scales, z = int4_weight(16, 128, 32, torch.float32, False)
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "kernel")
    assert cpu_route.int4_linear(k, x, qweight, scales, z, 32) is None
    assert cpu_route.int4_linear(k, torch.randn(64, 128).bfloat16(), qweight, scales, z, 32) is None
    assert calls == []


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 300])
def test_buckets(rows):
    assert cpu_route.bucket(rows) == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8}.get(rows, 32)


def test_ranking_is_measured_and_the_override_checked(monkeypatch):
    k = cpu_gemv.kernel()
    amx = {"amx"} if k.amx_available else set()
    assert set(cpu_route.ranking(k, "bf16", torch.bfloat16)) == {"torch"} | amx
    assert set(cpu_route.ranking(k, "bf16", torch.bfloat16, 1)) == {"kernel"} | amx
    assert set(cpu_route.ranking(k, "int4", torch.bfloat16, 4)) == {"kernel"} | amx
    assert set(cpu_route.ranking(k, "int8", torch.float32)) == {"kernel", "torch"}  # AMX takes bfloat16 x only
    with pytest.raises(ValueError, match="scheme"):
        cpu_route.ranking(k, "fp8", torch.bfloat16)
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "fast")
    with pytest.raises(ArtifactError, match="LMFORGE_LINEAR_WAY='fast'"):
        cpu_route.choose(k, "int4", torch.randn(32, 64))


def test_a_build_without_avx512_has_no_amx():
    assert not cpu_gemv.Kernel(cpu_gemv.build(VARIANTS["no-avx512"])).amx_available
