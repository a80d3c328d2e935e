"""The quantized linear ops: references against float64, the CPU kernel and the Triton path against the
reference, and the torch.library contract (schema, fake impl) that export and compile rely on."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.quant_linear import (fp8_linear, fp8_reference, int4_linear, int4_reference, int8_linear,
                                          int8_reference)
from lmforge.quant import fp8 as fp8_math
from lmforge.quant import int4 as int4_math
from lmforge.quant import int8 as int8_math
from tests.conftest import int4_float64


def _int4_inputs(M=3, N=37, K=128, G=32, dtype=torch.float32, zeros=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) + 0.1).to(dtype)
    q = torch.randint(0, 16, (N, K), generator=gen)
    scales = (torch.rand(N, K // G, generator=gen) * 0.02 + 0.001).to(dtype)
    z = (torch.rand(N, K // G, generator=gen) * 15).to(dtype) if zeros else None
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, int4_math.pack(q), scales, z, G, b


@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_reference_matches_float64(zeros, bias, dtype):
    args = _int4_inputs(dtype=dtype, zeros=zeros, bias=bias)
    y = int4_reference(*args)
    want = int4_float64(*args)
    assert y.dtype == dtype and y.shape == (3, 37)
    rel = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - want).abs() <= rel * want.abs() + 1e-4).all()


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernel")
@pytest.mark.parametrize("M", [1, 4, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_op_uses_the_cpu_kernel_with_float32_scales(M, dtype, monkeypatch):
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "kernel")  # 33 rows could take another way (test_cpu_route.py)
    x, q, scales, zeros, G, b = _int4_inputs(M=M, K=256, G=64, dtype=dtype)
    scales32, zeros32 = scales.float(), zeros.float()  # what the op's prepare hook gives the layer at load
    assert cpu_gemv.supports_int4(x, q, scales32, zeros32, G, b)
    calls, original = [], cpu_gemv.Kernel.int4

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cpu_gemv.Kernel, "int4", counting)
    y = int4_linear(x, q, scales32, zeros32, G, b)
    assert calls, "the op did not use the CPU kernel"
    want = int4_reference(x, q, scales, zeros, G, b)
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_int4_op_falls_back_to_the_reference_for_stored_dtypes(monkeypatch):
    """bfloat16 scales (as the artifact stores them): the reference's numbers (AMX's, on weights rounded to
    bfloat16, are tested in test_cpu_route.py)."""
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "kernel")
    args = _int4_inputs(dtype=torch.bfloat16)
    torch.testing.assert_close(int4_linear(*args), int4_reference(*args))


def test_int4_op_leading_dims_and_opcheck():
    x, q, s, z, G, b = _int4_inputs(K=64, G=32)
    x3 = x.reshape(3, 1, 64).expand(3, 2, 64).contiguous()
    y = int4_linear(x3, q, s, z, G, b)
    assert y.shape == (3, 2, 37)
    torch.testing.assert_close(y[:, 0], int4_reference(x, q, s, z, G, b), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(int4_linear, (x3, q, s, z, G, b), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(int4_linear, (x, q, s, None, G, None), test_utils=("test_schema", "test_faketensor"))


def test_fp8_reference_is_the_quantized_activation_product():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=gen) * torch.linspace(0.1, 10, 5)[:, None]
    p = fp8_math.quantize(torch.randn(40, 96, generator=gen) * 0.1)
    b = torch.randn(40, generator=gen)
    y = fp8_reference(x, p.qdata, p.scale, b)
    s = x.double().abs().amax(-1, keepdim=True) / 448
    xq = (x.double() / s).to(torch.float8_e4m3fn).double()  # e4m3 rounding of every activation, per row
    want = (xq @ p.qdata.double().T) * s * p.scale.double() + b.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    plain = x.double() @ fp8_math.dequantize(p).double().T + b.double()
    assert (y.double() - plain).abs().max() <= 0.06 * plain.abs().max()  # and it is close to the float product
    # (opcheck's schema test multiplies every tensor argument, which float8 tensors do not support on the CPU)
    torch.library.opcheck(fp8_linear, (x, p.qdata, p.scale, b), test_utils=("test_faketensor",))
    xb, bb = x.bfloat16(), b.bfloat16()
    assert torch.equal(fp8_linear(xb, p.qdata, p.scale, bb), fp8_reference(xb, p.qdata, p.scale, bb))


def _int8_inputs(M=3, N=37, K=96, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) + 0.1).to(dtype)
    p = int8_math.quantize(torch.randn(N, K, generator=gen) * 0.1)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, p.qdata, p.scale, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_reference_matches_float64(bias, dtype):
    x, q, s, b = _int8_inputs(dtype=dtype, bias=bias)
    y = int8_reference(x, q, s, b)
    want = x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (3, 37)
    rel = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - want).abs() <= rel * want.abs() + 1e-4).all()


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernel")
@pytest.mark.parametrize("M", [1, 4, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_op_uses_the_cpu_kernel(M, dtype, monkeypatch):
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "kernel")  # 33 rows could take another way (test_cpu_route.py)
    x, q, s, b = _int8_inputs(M=M, K=200, dtype=dtype)
    calls, original = [], cpu_gemv.Kernel.int8
    monkeypatch.setattr(cpu_gemv.Kernel, "int8", lambda self, *a: calls.append(1) or original(self, *a))
    y = int8_linear(x, q, s, b)
    assert calls, "the op did not use the CPU kernel"
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), int8_reference(x, q, s, b).float(), rtol=tol, atol=tol)


def test_int8_op_leading_dims_fallback_and_opcheck():
    x, q, s, b = _int8_inputs()
    x3 = x.reshape(3, 1, 96).expand(3, 2, 96).contiguous()
    y = int8_linear(x3, q, s, b)
    assert y.shape == (3, 2, 37)
    torch.testing.assert_close(y[:, 0], int8_reference(x, q, s, b), rtol=1e-5, atol=1e-5)
    xh, bh = x.half(), b.half()  # float16: no CPU kernel, the reference
    assert torch.equal(int8_linear(xh, q, s, bh), int8_reference(xh, q, s, bh))
    torch.library.opcheck(int8_linear, (x3, q, s, b), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(int8_linear, (x, q, s, None), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="the CPU runs Triton interpreted")
def test_triton_path_through_the_ops(monkeypatch):
    """LMFORGE_KERNELS=triton sends the ops to codegen/kernels/int4.py, fp8.py and int8.py (in the interpreter, on
    the CPU)."""
    from lmforge.codegen.kernels import fp8, int4, int8

    calls = []
    for kernels, name in ((int4, "int4_matmul"), (fp8, "fp8_matmul"), (int8, "int8_matmul")):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    x, q, s, z, G, b = _int4_inputs(M=2, N=40, K=64, G=32)
    x3 = x.reshape(2, 1, 64)
    y = int4_linear(x3, q, s, z, G, b)
    torch.testing.assert_close(y[:, 0], int4_reference(x, q, s, z, G, b), rtol=1e-4, atol=1e-4)
    p = fp8_math.quantize(torch.randn(40, 64, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(fp8_linear(x3, p.qdata, p.scale, b)[:, 0], fp8_reference(x, p.qdata, p.scale, b),
                               rtol=1e-4, atol=1e-4)
    x8, q8, s8, b8 = _int8_inputs(M=2, N=40, K=64)
    torch.testing.assert_close(int8_linear(x8.reshape(2, 1, 64), q8, s8, b8)[:, 0], int8_reference(x8, q8, s8, b8),
                               rtol=1e-4, atol=1e-4)
    assert calls == ["int4_matmul", "fp8_matmul", "int8_matmul"]
